"""`blobscore exporter`: the Prometheus metrics no single worker knows, read from Redis on every scrape.

Each worker serves its own counters (worker/metrics.py). This small process serves the fleet's state: the depth of
every service queue, the jobs still running with their counts, each job's window of tasks waiting, the schedules'
last and next runs, and whether a live worker consumes each queue (worker/presence.py). Nothing is kept between
scrapes but the ids of jobs already done (they never change again).

A scrape is a handful of Redis round trips whatever the size of the jobs: SCAN over the `<prefix>job:*` hashes
(a job's listing pages and outcome bitmaps are strings, filtered out by Redis), one pipelined HMGET of the job
records not known to be done, one pipelined SCARD of their retrying sets, one pipeline of LLEN and presence MGETs
for the queues, and ~5 calls per schedule. Measured with a 200,000-image job: bench/README.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from producer.scheduling.store import ScheduleStore
from worker import metrics
from worker.errors import BlobscoreError
from worker.presence import QueuePresence, seen_key, taken_key
from worker.redis_client import open_redis
from worker.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_PORT = 9108
# Per-job series for at most this many running jobs (the newest): a scrape stays small whatever piles up.
MAX_JOBS = 200
SCAN_COUNT = 1000
JOB_FIELDS = ("listed", "ok", "rejected", "next_index", "listing_done", "service", "created_at", "window")
JOB_LABELS = ("job_id", "service")
QUEUE_LABELS = ("service", "queue")


@dataclass(frozen=True)
class JobRow:
    """A running job's counts as one scrape read them."""

    job_id: str
    service: str
    listed: int
    ok: int
    rejected: int
    next_index: int
    listing_done: bool
    created_at: float
    window: int
    retrying: int = 0

    @property
    def pending(self) -> int:
        """Listed and not finished (ok or rejected)."""
        return max(self.listed - self.ok - self.rejected, 0)

    @property
    def waiting(self) -> int:
        """Image tasks published and not finished: what the job's window bounds."""
        return max(self.next_index - self.ok - self.rejected, 0)

    @property
    def done(self) -> bool:
        """Listed to the end and every image finished (`blobscore status`'s `done`)."""
        return self.listing_done and self.ok + self.rejected >= self.listed


def parse_job(job_id: str, values: list[str | None], default_window: int) -> JobRow | None:
    """A job record's fields (in JOB_FIELDS order) as a JobRow; None when the key is not a job record."""
    listed, ok, rejected, next_index, listing_done, service, created_at, window = values
    if listed is None or service is None:
        return None
    return JobRow(job_id, service, int(listed), int(ok or 0), int(rejected or 0), int(next_index or 0),
                  listing_done == "1", float(created_at or 0.0), int(window or default_window))


class _Families:
    """The metric families of one scrape (fresh each time: a collector yields new objects per collect)."""

    def __init__(self) -> None:
        def job(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=JOB_LABELS)

        def queue(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=QUEUE_LABELS)

        self.queue_depth = queue("blobscore_queue_depth", "Image tasks waiting in the service's queue (LLEN).")
        self.queue_consumed = queue("blobscore_queue_consumed",
                                    "1 while a live worker consumes the queue (its heartbeat under 15 s old), else 0.")
        self.queue_seen_age = queue("blobscore_queue_worker_seen_age_seconds",
                                    "Seconds since a worker consuming the queue last said so (absent: never).")
        self.queue_taken_age = queue("blobscore_queue_task_taken_age_seconds",
                                     "Seconds since a worker last took a task from the queue (absent: never).")
        self.jobs_active = GaugeMetricFamily("blobscore_jobs_active", "Jobs not done (listing, or images pending).")
        self.job_listed = job("blobscore_job_listed", "Images listed so far by a running job.")
        self.job_ok = job("blobscore_job_ok", "Images of a running job scored ok.")
        self.job_rejected = job("blobscore_job_rejected", "Images of a running job rejected.")
        self.job_retrying = job("blobscore_job_retrying", "Images of a running job waiting on a retry.")
        self.job_pending = job("blobscore_job_pending", "Images of a running job listed and not finished.")
        self.job_waiting = job("blobscore_job_tasks_waiting",
                               "Image tasks of a running job published and not finished: what its window bounds.")
        self.job_window = job("blobscore_job_window", "The most image tasks of the job waiting in the broker at once.")
        self.job_listing_done = job("blobscore_job_listing_done", "1 once the job's listing reached its end.")
        self.job_created = job("blobscore_job_created_timestamp_seconds", "When the job was created (Unix time).")
        self.window = GaugeMetricFamily("blobscore_enqueue_window",
                                        "The configured window (BLOBSCORE_ENQUEUE_WINDOW): a new job's default.")
        self.schedule_last = GaugeMetricFamily("blobscore_schedule_last_run_timestamp_seconds",
                                               "When the schedule's last run started (Unix time).",
                                               labels=["schedule"])
        self.schedule_next = GaugeMetricFamily("blobscore_schedule_next_run_timestamp_seconds",
                                               "When the schedule is next due (Unix time).", labels=["schedule"])
        self.schedule_last_listed = GaugeMetricFamily("blobscore_schedule_last_run_images",
                                                      "Images the schedule's last run queued.", labels=["schedule"])
        self.schedule_runs = CounterMetricFamily("blobscore_schedule_runs", "Runs of the schedule so far.",
                                                 labels=["schedule"])

    def all(self) -> list[Metric]:
        return [value for value in vars(self).values() if isinstance(value, Metric)]


def _status_families(up: float | None = None, seconds: float | None = None) -> list[GaugeMetricFamily]:
    redis_up = GaugeMetricFamily("blobscore_exporter_redis_up", "1 when the last scrape read Redis, 0 when it failed.")
    duration = GaugeMetricFamily("blobscore_exporter_scrape_duration_seconds",
                                 "How long the exporter's last scrape took, Redis round trips included.")
    if up is not None and seconds is not None:
        redis_up.add_metric([], up)
        duration.add_metric([], seconds)
    return [redis_up, duration]


class FleetCollector(Collector):
    """Reads the fleet's state from Redis on every scrape (a prometheus_client custom collector)."""

    def __init__(
        self, settings: Settings, jobs_client: redis.Redis, broker_client: redis.Redis,
        schedules: ScheduleStore | None = None, max_jobs: int = MAX_JOBS,
    ) -> None:
        self._settings = settings
        self._prefix = settings.key_prefix
        self._jobs_client = jobs_client
        self._broker = broker_client
        self._schedules = schedules
        self._max_jobs = max_jobs
        self._done: set[str] = set()

    def describe(self) -> Iterable[Metric]:
        """The families this collector yields, without reading Redis."""
        return [*_Families().all(), *_status_families()]

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        families = _Families()
        try:
            self._read(families)
        except (redis.RedisError, BlobscoreError, OSError) as exc:
            log.warning("exporter: reading Redis failed: %s", exc)
            yield from _status_families(0.0, time.perf_counter() - started)
            return
        yield from families.all()
        yield from _status_families(1.0, time.perf_counter() - started)

    def _read(self, families: _Families) -> None:
        families.window.add_metric([], self._settings.enqueue_window)
        jobs = self.running_jobs()
        families.jobs_active.add_metric([], len(jobs))
        shown = jobs[: self._max_jobs]
        for row in shown:
            labels = [row.job_id, row.service]
            families.job_listed.add_metric(labels, row.listed)
            families.job_ok.add_metric(labels, row.ok)
            families.job_rejected.add_metric(labels, row.rejected)
            families.job_retrying.add_metric(labels, row.retrying)
            families.job_pending.add_metric(labels, row.pending)
            families.job_waiting.add_metric(labels, row.waiting)
            families.job_window.add_metric(labels, row.window)
            families.job_listing_done.add_metric(labels, float(row.listing_done))
            families.job_created.add_metric(labels, row.created_at)
        services = sorted({*self._settings.all_services(), *(row.service for row in shown)})
        self._read_queues(families, services)
        self._read_schedules(families)

    def running_jobs(self) -> list[JobRow]:
        """Jobs not done, newest first; the retrying counts read for the first `max_jobs` only."""
        pattern, start = f"{self._prefix}job:*", len(self._prefix) + len("job:")
        # Job records are hashes: SCAN's TYPE filter (Redis 6+) leaves the listing pages, bitmaps and sets out on the
        # server; a job's other hashes (`<id>:errors`) are keys under its own, skipped by name.
        ids = {key[start:] for key in self._jobs_client.scan_iter(match=pattern, count=SCAN_COUNT, _type="hash")}
        candidates = sorted(job_id for job_id in ids if ":" not in job_id and job_id not in self._done)
        if not candidates:
            return []
        pipe = self._jobs_client.pipeline(transaction=False)
        for job_id in candidates:
            pipe.hmget(f"{self._prefix}job:{job_id}", JOB_FIELDS)
        rows: list[JobRow] = []
        for job_id, values in zip(candidates, pipe.execute(), strict=True):
            row = parse_job(job_id, values, self._settings.enqueue_window)
            if row is None:
                continue
            if row.done:
                self._done.add(job_id)  # a done job never changes again: not read on later scrapes
            else:
                rows.append(row)
        rows.sort(key=lambda row: (row.created_at, row.job_id), reverse=True)
        shown = rows[: self._max_jobs]
        pipe = self._jobs_client.pipeline(transaction=False)
        for row in shown:
            pipe.scard(f"{self._prefix}job:{row.job_id}:retrying")
        counts = pipe.execute() if shown else []
        return [*(_with_retrying(row, int(count)) for row, count in zip(shown, counts, strict=True)),
                *rows[self._max_jobs:]]

    def _read_queues(self, families: _Families, services: list[str]) -> None:
        queues = [self._settings.queue_for(service) for service in services]
        depths = self._broker.pipeline(transaction=False)
        for queue in queues:
            depths.llen(queue)
        stamps = self._jobs_client.pipeline(transaction=False)
        for queue in queues:
            stamps.mget([seen_key(self._prefix, queue), taken_key(self._prefix, queue)])
        now = time.time()
        for service, queue, depth, (seen, taken) in zip(services, queues, depths.execute(), stamps.execute(),
                                                        strict=True):
            labels = [service, queue]
            families.queue_depth.add_metric(labels, int(depth))
            presence = QueuePresence(queue, _age(now, seen), _age(now, taken))
            families.queue_consumed.add_metric(labels, float(presence.consumed))
            if presence.worker_seen_s is not None:
                families.queue_seen_age.add_metric(labels, presence.worker_seen_s)
            if presence.task_taken_s is not None:
                families.queue_taken_age.add_metric(labels, presence.task_taken_s)

    def _read_schedules(self, families: _Families) -> None:
        if self._schedules is None:
            return
        for info in self._schedules.infos():
            name = [info.spec.name]
            families.schedule_runs.add_metric(name, info.runs)
            if info.last_run is not None:
                families.schedule_last.add_metric(name, info.last_run.started_at)
                families.schedule_last_listed.add_metric(name, info.last_run.listed)
            if info.next_run_at is not None:
                families.schedule_next.add_metric(name, info.next_run_at)


def _with_retrying(row: JobRow, retrying: int) -> JobRow:
    return JobRow(row.job_id, row.service, row.listed, row.ok, row.rejected, row.next_index, row.listing_done,
                  row.created_at, row.window, retrying)


def _age(now: float, stamp: str | None) -> float | None:
    return None if stamp is None else max(now - float(stamp), 0.0)


def exporter_registry(settings: Settings, with_schedules: bool = True) -> tuple[CollectorRegistry, FleetCollector]:
    """A registry holding the fleet collector (and the exporter process's own CPU and memory)."""
    from prometheus_client import ProcessCollector

    schedules = ScheduleStore.from_settings(settings) if with_schedules else None
    collector = FleetCollector(settings, open_redis(settings.jobs_url), open_redis(settings.broker_url), schedules)
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry, collector


def serve(settings: Settings, port: int, host: str = "0.0.0.0") -> int:
    """Serve the fleet's metrics at http://host:port/metrics from a daemon thread; the port bound."""
    registry, _ = exporter_registry(settings)
    return metrics.serve(port, host, registry)
