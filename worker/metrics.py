"""Prometheus metrics of one worker process, counted at the edges: the task wrapper and the adapters.

Each worker process serves its own REGISTRY on one HTTP port (`BLOBSCORE_METRICS_PORT`, `blobscore worker
--metrics-port`; off when unset): the worker is one process with a thread pool, so one server sees every thread.
Every call here is in memory (a dict look-up, a lock, an add): no I/O per image, ~10 µs of CPU an image
(bench/metrics_cost.py). What no single worker knows — queue depth, jobs, schedules, which queues have a live
worker — is the exporter's (`blobscore exporter`, producer/exporter.py).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import ParamSpec

import redis
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.metrics_core import Metric

from worker.errors import ConfigurationError

P = ParamSpec("P")

# No `*_created` series next to every counter and histogram: nothing here needs them, and they double the output.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

STAGES = ("download", "check", "score", "upload")
# A structure check is well under a millisecond, a download of a 6 MB photo a second or more; the deadline of a call
# is 10 s by default (scoring) and 30 s (Blob reads).
STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TASK_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 90.0)

IMAGES = Counter(
    "blobscore_images_total",
    "Images whose result this worker wrote: status ok, or rejected with its code (empty for ok).",
    ["service", "status", "code"], registry=REGISTRY,
)
ALREADY_DONE = Counter(
    "blobscore_images_already_done_total",
    "Retried or redelivered tasks that found the image's result already written (the image is not counted again).",
    ["service"], registry=REGISTRY,
)
RETRIES = Counter(
    "blobscore_retries_total",
    "Failed attempts that will be retried, by reason: a gRPC status, circuit_open, or the error's class.",
    ["service", "reason"], registry=REGISTRY,
)
GRPC_ERRORS = Counter(
    "blobscore_grpc_errors_total", "Calls to a scoring service that failed, by gRPC status code.",
    ["service", "code"], registry=REGISTRY,
)
HANDED_BACK = Counter(
    "blobscore_tasks_handed_back_total",
    "Tasks of another deployment or storage account handed back untouched (requeued on their own queue).",
    registry=REGISTRY,
)
REFUSED = Counter("blobscore_tasks_refused_total", "Malformed task messages refused.", registry=REGISTRY)
BLOB_ERRORS = Counter(
    "blobscore_blob_errors_total",
    "Blob Storage requests that failed, by kind: unreachable, throttled, timeout, server_error, auth, client_error, "
    "other, and the expected answers not_found (a retried task looks for its result) and conflict (a create-only "
    "write lost a race).",
    ["kind"], registry=REGISTRY,
)
REDIS_ERRORS = Counter(
    "blobscore_redis_errors_total",
    "Redis errors that failed an image's attempt (job counters, poison-pill counts), by kind: connection, timeout, "
    "response, other.",
    ["kind"], registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "blobscore_stage_seconds", "Time of one stage of one image: download, check, score (the Predict call), upload.",
    ["service", "stage"], buckets=STAGE_BUCKETS_S, registry=REGISTRY,
)
TASK_SECONDS = Histogram(
    "blobscore_task_seconds", "Time of one run of an image's task (one attempt), end to end.",
    ["service"], buckets=TASK_BUCKETS_S, registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "blobscore_images_in_flight", "Images this worker process is working on now.", ["service"], registry=REGISTRY,
)
BREAKER_OPEN = Gauge(
    "blobscore_breaker_open",
    "The service's circuit breaker as this worker last saw it: 1 open (calls held off), 0 closed.",
    ["service"], registry=REGISTRY,
)
CONCURRENCY = Gauge(
    "blobscore_worker_concurrency", "Images this worker process may have in flight at once (its threads).",
    registry=REGISTRY,
)

# Labelled children looked up once: `labels()` builds a tuple and takes a lock on every call, a dict get does not.
_children: dict[tuple[object, ...], object] = {}
_children_lock = threading.Lock()


def _child(metric: Counter | Gauge | Histogram, *values: str) -> object:
    key = (metric, *values)
    found = _children.get(key)
    if found is None:
        with _children_lock:
            found = _children.setdefault(key, metric.labels(*values))
    return found


def stage_histogram(service: str, stage: str) -> Histogram:
    """The `blobscore_stage_seconds` child of a service and stage."""
    child: Histogram = _child(STAGE_SECONDS, service, stage)  # type: ignore[assignment]
    return child


def task_histogram(service: str) -> Histogram:
    """The `blobscore_task_seconds` child of a service."""
    child: Histogram = _child(TASK_SECONDS, service)  # type: ignore[assignment]
    return child


def in_flight(service: str) -> Gauge:
    """The `blobscore_images_in_flight` child of a service."""
    child: Gauge = _child(IN_FLIGHT, service)  # type: ignore[assignment]
    return child


def observe_image(service: str, status: str, code: str | None, written: bool, timings_ms: Mapping[str, float]) -> None:
    """One image's outcome: its count (a written result) and the time of each stage it went through."""
    if written:
        counter: Counter = _child(IMAGES, service, status, code or "")  # type: ignore[assignment]
    else:
        counter = _child(ALREADY_DONE, service)  # type: ignore[assignment]
    counter.inc()
    for stage, ms in timings_ms.items():
        if stage in STAGES:
            stage_histogram(service, stage).observe(ms / 1000.0)


def observe_retry(service: str, reason: str, error: BaseException) -> None:
    """A failed attempt that will be retried, and the Redis error behind it, if any."""
    counter: Counter = _child(RETRIES, service, reason)  # type: ignore[assignment]
    counter.inc()
    count_redis_error(error)


def count_grpc_error(service: str | None, code: str) -> None:
    """A scoring call that failed with gRPC status `code` (its name, e.g. UNAVAILABLE)."""
    counter: Counter = _child(GRPC_ERRORS, service or "", code)  # type: ignore[assignment]
    counter.inc()


def blob_error_kind(error: BaseException) -> str:
    """The kind of a Blob Storage SDK error, for `blobscore_blob_errors_total`."""
    if isinstance(error, ResourceNotFoundError):
        return "not_found"
    if isinstance(error, ResourceExistsError | ResourceModifiedError):
        return "conflict"
    if isinstance(error, ClientAuthenticationError):
        return "auth"
    if isinstance(error, ServiceRequestError | ServiceResponseError):
        return "unreachable"
    if isinstance(error, HttpResponseError):
        status = error.status_code or 0
        if status in (429, 503):
            return "throttled"
        if status == 408:
            return "timeout"
        return "server_error" if status >= 500 else "client_error"
    return "other"


def counts_blob_errors(factory: Callable[P, AbstractContextManager[None]]) -> Callable[P, AbstractContextManager[None]]:
    """Decorate the Blob adapter's error-translating context manager: every SDK error is counted by kind before it
    is translated (worker/storage.py `_translated`)."""

    @functools.wraps(factory)
    @contextmanager
    def counted(*args: P.args, **kwargs: P.kwargs) -> Iterator[None]:
        with factory(*args, **kwargs):
            try:
                yield
            except AzureError as error:
                counter: Counter = _child(BLOB_ERRORS, blob_error_kind(error))  # type: ignore[assignment]
                counter.inc()
                raise

    return counted


def redis_error_kind(error: BaseException) -> str | None:
    """The kind of the first Redis error in `error`'s chain of causes, or None when Redis had no part in it."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, redis.TimeoutError):
            return "timeout"
        if isinstance(current, redis.ConnectionError):
            return "connection"
        if isinstance(current, redis.ResponseError):
            return "response"
        if isinstance(current, redis.RedisError):
            return "other"
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def count_redis_error(error: BaseException) -> None:
    """Count the Redis error behind `error`, if there is one."""
    kind = redis_error_kind(error)
    if kind is not None:
        counter: Counter = _child(REDIS_ERRORS, kind)  # type: ignore[assignment]
        counter.inc()


def serve(port: int, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> int:
    """Serve `registry` at http://host:port/metrics from a daemon thread; the port bound (ConfigurationError if the
    port cannot be had)."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): set BLOBSCORE_METRICS_PORT "
            "(or --metrics-port / --port) to a free port"
        ) from None
    return int(server.server_port)


def series_names(families: Iterable[Metric]) -> set[str]:
    """Every series name these metric families can expose (counters' `_total`, histograms' `_bucket`/`_sum`/
    `_count`), whether or not a labelled metric has a child yet: what alert rules and dashboards may refer to."""
    names: set[str] = set()
    for family in families:
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "summary": ("_sum", "_count", ""), "info": ("_info",)}.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
        names.update(sample.name for sample in family.samples)
    return names
