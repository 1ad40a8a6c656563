"""The fault suite's machinery: real processes on 127.0.0.1, a job per test, and the tally every test ends with.

Nothing here fakes Redis, Blob Storage or gRPC: workers, stand-ins, Redis and Azurite are real processes, and the
only thing between a worker and a service is, in one scenario, a byte-forwarding TCP proxy.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import harness
import pytest
import redis
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient
from harness import REPO as REPO  # re-exported: the fault scenarios take it from here
from harness import service_env
from shared_helpers import run_cli_json, settings_of

from deploy.local.azurite import AzuriteUnavailableError, start_azurite
from deploy.local.procs import ManagedProcess
from worker.jobs import JobStore
from worker.results import result_location

KEY = "faults-secret-key"
AZURITE_ACCOUNT_PATH = "/devstoreaccount1/"
# Short timeouts so that every recovery (visibility timeout included) fits in seconds, not minutes. The settings
# validator wants visibility > max(backoff cap, 2 * breaker open) + task time limit: 9 > 2 + 6.
FAST_SETTINGS = {
    "BLOBSCORE_VISIBILITY_TIMEOUT_S": "9",
    "BLOBSCORE_TASK_TIME_LIMIT_S": "6",
    "BLOBSCORE_SCORING_TIMEOUT_S": "2",
    "BLOBSCORE_RETRY_BACKOFF_MAX_S": "1",
    "BLOBSCORE_BREAKER_OPEN_S": "1",
    "BLOBSCORE_SOFT_SHUTDOWN_TIMEOUT_S": "3",
}
VISIBILITY_TIMEOUT_S = float(FAST_SETTINGS["BLOBSCORE_VISIBILITY_TIMEOUT_S"])
_PUT_LINE = re.compile(r'"PUT (?P<url>\S+) HTTP/[\d.]+" (?P<status>\d{3})')


@dataclass(frozen=True)
class AzuriteService:
    """A running Azurite and the file its access log goes to."""

    port: int
    connection_string: str
    log: Path
    process: ManagedProcess


def start_logged_azurite(port: int, log: Path, location: Path | None = None) -> ManagedProcess:
    """Azurite with its access log on (one line per request: how result writes are counted)."""
    try:
        return start_azurite(port, log, location, access_log=True)
    except AzuriteUnavailableError as exc:
        pytest.fail(f"the fault suite needs Azurite (npm package from package.json): {exc}", pytrace=False)


def fault_env(
    *, broker_url: str, blob_connection_string: str, scoring_port: int, service: str,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The BLOBSCORE_* environment of one test's workers and CLI (tests/harness.py): own queue, short timeouts."""
    return service_env(broker_url=broker_url, connection_string=blob_connection_string, scoring_port=scoring_port,
                       key=KEY, service=service, queue_prefix="faults", extra={**FAST_SETTINGS, **(extra or {})})


# --- images -------------------------------------------------------------------------------------------------------



def sha256(data: bytes) -> str:
    """The digest the stand-in keys its per-image call counts by."""
    return hashlib.sha256(data).hexdigest()


# --- processes ----------------------------------------------------------------------------------------------------


class Processes:
    """Every process a test started, killed at teardown whatever happened (only ours, by pid group)."""

    def __init__(self) -> None:
        self._started: list[ManagedProcess] = []

    def track(self, process: ManagedProcess) -> ManagedProcess:
        """Remember `process` for teardown."""
        self._started.append(process)
        return process

    def stop_all(self) -> None:
        """Kill whatever still runs, newest first: the scenario is over, a graceful end would only cost time."""
        for process in reversed(self._started):
            process.kill()


def start_standin(
    procs: Processes, workdir: Path, port: int, *args: str, stats_file: Path, service: str,
    no_model: bool = True, tag: str = "standin",
) -> ManagedProcess:
    """A real `python -m deploy.standin` on 127.0.0.1:`port` (0: a free one), once it listens (tests/harness.py)."""
    argv = ["--service-name", service, "--stats-file", str(stats_file), *args]
    if no_model:
        argv += ["--no-model"]
        if not any(arg.startswith("--emulate-latency-ms") for arg in args):
            argv += ["--emulate-latency-ms", "20"]
    process, _ = harness.start_standin(workdir, *argv, key=KEY, port=port, log_name=f"{tag}.log")
    return procs.track(process)


def standin_port(process: ManagedProcess) -> int:
    """The port a stand-in said it listens on."""
    return int(process.wait_for_log(r"listening on [^\s]+:(\d+)", timeout=1).group(1))


def start_worker(
    procs: Processes, env: dict[str, str], log: Path, concurrency: int = 2, extra: dict[str, str] | None = None,
) -> ManagedProcess:
    """A real `python -m worker` (Celery, thread pool), once it says it is ready (tests/harness.py)."""
    return procs.track(harness.start_worker(env, log, concurrency, extra))


def kill9(process: ManagedProcess) -> float:
    """SIGKILL the process (its whole group); returns the moment it happened (time.monotonic)."""
    process.kill()
    return time.monotonic()


def term(process: ManagedProcess) -> float:
    """SIGTERM the process alone (a warm shutdown); returns the moment it happened."""
    os.kill(process.pid, signal.SIGTERM)
    return time.monotonic()


def wait_exit(process: ManagedProcess, timeout: float) -> float:
    """Wait for `process` to end; returns when it did (time.monotonic)."""
    deadline = time.monotonic() + timeout
    while process.alive():
        assert time.monotonic() < deadline, f"{process} still runs after {timeout} s:\n{process.log_tail()}"
        time.sleep(0.05)
    return time.monotonic()




def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll_s: float = 0.02) -> float:
    """Poll `condition` until true; returns when it became true (time.monotonic)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(poll_s)
    return time.monotonic()


# --- the job under test -------------------------------------------------------------------------------------------


@dataclass
class FaultJob:
    """One test's job: its container, environment, services' logs, and the tally at the end."""

    scenario: str
    workdir: Path
    env: dict[str, str]
    blob_service: BlobServiceClient
    container: str
    service: str
    azurite_log: Path
    stats_files: list[Path]
    uploads: dict[str, bytes] = field(default_factory=dict)
    job_id: str | None = None
    listed: int = 0
    enqueued_at: float = 0.0
    _azurite_log_offset: int = 0
    _calls_before: dict[str, int] = field(default_factory=dict)

    @property
    def results_prefix(self) -> str:
        """Where this job's results go (the source container, the default prefix)."""
        return f"blobscore-results/{self.service}/"

    @property
    def key_prefix(self) -> str:
        """The Redis key prefix of the job's deployment (its queue and its Azurite's namespace)."""
        return settings_of(self.env).key_prefix

    @property
    def jobs_url(self) -> str:
        """The Redis holding the job record."""
        return self.env["BLOBSCORE_BROKER_URL"]

    def result_name(self, blob: str) -> str:
        """The expected result blob of a source blob."""
        return result_location(self.results_prefix, blob)[0]

    def start_standin(
        self, procs: Processes, *args: str, port: int = 0, no_model: bool = True, tag: str = "standin",
    ) -> ManagedProcess:
        """Start a stand-in for this job's service (stats in its own file) and point the job's environment at it."""
        stats_file = self.workdir / f"{tag}-stats.json"
        process = start_standin(procs, self.workdir, port, *args, stats_file=stats_file, service=self.service,
                                no_model=no_model, tag=tag)
        self.stats_files.append(stats_file)
        self.env["BLOBSCORE_SCORING_PORT"] = str(standin_port(process))
        return process

    def upload(self, blobs: dict[str, bytes]) -> None:
        """Upload source blobs (overwriting) and remember their bytes for the scorer-call count."""
        container = self.blob_service.get_container_client(self.container)
        for name, data in blobs.items():
            container.upload_blob(name, data, overwrite=True)
            self.uploads[name] = data

    def enqueue(self, *args: str) -> dict[str, Any]:
        """Run `blobscore enqueue --container C --json` and remember the job."""
        self._azurite_log_offset = _size(self.azurite_log)
        self._calls_before = self.scorer_calls(since_enqueue=False)
        self.enqueued_at = time.monotonic()
        report = run_cli_json(self.env, self.workdir, "enqueue", "--wait", "--container", self.container, *args)
        self.job_id = report["job_id"]
        self.listed = int(report["listed"])
        return report

    def jobs(self) -> JobStore:
        """A JobStore on the job's Redis (close it after use)."""
        return JobStore.from_url(self.jobs_url, self.key_prefix)

    def counted(self, outcome: Literal["ok", "rejected"]) -> set[str]:
        """The images the job record counts with `outcome`."""
        assert self.job_id is not None
        store = self.jobs()
        try:
            return set(store.members(self.job_id, outcome))
        finally:
            store.close()

    def status(self) -> dict[str, Any]:
        """The job's counts, read straight from Redis (no CLI start-up per poll)."""
        assert self.job_id is not None
        store = self.jobs()
        try:
            status = store.status(self.job_id)
        finally:
            store.close()
        return {"listed": status.listed, "ok": status.ok, "rejected": status.rejected,
                "retrying": status.retrying, "pending": status.pending, "state": status.state}

    def wait_done(self, timeout: float) -> float:
        """Wait until listed = ok + rejected; returns when (time.monotonic)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.status()
            except Exception as exc:  # Redis down in a Redis scenario: keep polling until the deadline.
                status = {"state": f"unreadable: {exc}"}
            if status["state"] == "done":
                return time.monotonic()
            assert time.monotonic() < deadline, f"job {self.job_id} not done after {timeout} s: {status}"
            time.sleep(0.1)

    def result_exists(self, blob: str) -> bool:
        """Whether the result blob of `blob` exists now."""
        try:
            self.blob_service.get_blob_client(self.container, self.result_name(blob)).get_blob_properties()
        except ResourceNotFoundError:
            return False
        return True

    def results(self) -> dict[str, dict[str, Any]]:
        """Source blob name -> its result document, read from one listing of the results prefix."""
        container = self.blob_service.get_container_client(self.container)
        found: dict[str, dict[str, Any]] = {}
        for item in container.list_blobs(name_starts_with=self.results_prefix, include=["metadata"]):
            source = self.source_of(item.name)
            doc: dict[str, Any] = json.loads(container.get_blob_client(item.name).download_blob().readall())
            doc["_metadata"] = dict(item.metadata or {})
            found[source] = doc
        return found

    def result_writes(self) -> Counter[str]:
        """Successful Put Blob requests per result blob since the enqueue, from Azurite's access log."""
        writes: Counter[str] = Counter()
        with self.azurite_log.open("rb") as handle:
            handle.seek(self._azurite_log_offset)
            text = handle.read().decode(errors="replace")
        wanted = f"{AZURITE_ACCOUNT_PATH}{self.container}/"
        for match in _PUT_LINE.finditer(text):
            parts = urlsplit(match["url"])
            if parts.query or not match["status"].startswith("2") or not parts.path.startswith(wanted):
                continue  # container creation, metadata/property calls, refusals (409/412)
            name = unquote(parts.path[len(wanted):])
            if name.startswith(self.results_prefix):
                writes[self.source_of(name)] += 1
        return writes

    def source_of(self, result_blob: str) -> str:
        """The source blob a result blob answers for (names with no usual result name get a hashed one)."""
        hashed = {result_location(self.results_prefix, name)[0]: name for name in self.uploads}
        return hashed.get(result_blob, result_blob[len(self.results_prefix):-len(".json")])

    def scorer_calls(self, since_enqueue: bool = True) -> dict[str, int]:
        """Predict calls per uploaded image (failed calls included) over this job's stand-ins, since the enqueue."""
        by_hash: Counter[str] = Counter()
        for path in self.stats_files:
            if path.exists():
                by_hash.update(json.loads(path.read_text()).get("by_sha256", {}))
        before = self._calls_before if since_enqueue else {}
        return {name: by_hash.get(sha256(data), 0) - before.get(name, 0) for name, data in self.uploads.items()}

    def current_etags(self) -> dict[str, str]:
        """Source blob name -> its etag now (unquoted)."""
        container = self.blob_service.get_container_client(self.container)
        return {item.name: str(item.etag).strip('"') for item in container.list_blobs()
                if not item.name.startswith("blobscore-results/")}

    def tally(self, **extra: Any) -> dict[str, Any]:
        """The end-of-test tally: listed, results, rejected, lost, doubled, scorer calls per image."""
        assert self.job_id is not None
        store = self.jobs()
        try:
            listed_names = set(store.members(self.job_id, "listed"))
        finally:
            store.close()
        results = self.results()
        etags = self.current_etags()
        lost = sorted(
            name for name in listed_names
            if name not in results or (name in etags and results[name]["source"]["etag"] != etags[name])
        )
        writes = self.result_writes()
        doubled = sorted(name for name, count in writes.items() if count > 1)
        calls = self.scorer_calls()
        listed_calls = [calls[name] for name in listed_names if name in calls]
        rejected = Counter(
            doc["error"]["code"] for name, doc in results.items()
            if name in listed_names and doc["status"] == "rejected"
        )
        return {
            "scenario": self.scenario,
            "listed": len(listed_names),
            "results": sum(1 for name in listed_names if name in results),
            "ok": sum(1 for name in listed_names if results.get(name, {}).get("status") == "ok"),
            "rejected": sum(rejected.values()),
            "rejected_codes": dict(sorted(rejected.items())),
            "lost": len(lost),
            "lost_names": lost,
            "doubled": len(doubled),
            "doubled_names": doubled,
            "result_writes": sum(writes.values()),
            # Results with no write in Azurite's access log (the log can drop a line when Azurite is stopped).
            "unlogged_writes": sum(1 for name in listed_names if name in results and not writes.get(name)),
            "scorer_calls_total": sum(listed_calls),
            "scorer_calls_max": max(listed_calls, default=0),
            "scorer_calls_per_image": round(sum(listed_calls) / len(listed_calls), 2) if listed_calls else 0.0,
            "status": self.status(),
            **extra,
        }


def assert_clean(tally: dict[str, Any], *, log_may_miss_writes: bool = False) -> None:
    """What every scenario must end with: each listed image holds one current result, written once.

    "Written once" is read from Azurite's access log, so the log must account for every result (unless the scenario
    stops Azurite, which can drop the line of a request it answered just before closing)."""
    assert tally["lost"] == 0, f"lost images: {tally['lost_names']}"
    assert tally["doubled"] == 0, f"images written more than once: {tally['doubled_names']}"
    if not log_may_miss_writes:
        assert tally["unlogged_writes"] == 0, tally
    assert tally["results"] == tally["listed"], tally
    assert tally["status"]["state"] == "done", tally
    assert tally["status"]["ok"] + tally["status"]["rejected"] == tally["listed"], tally
    assert tally["status"]["ok"] == tally["ok"], tally
    assert tally["status"]["rejected"] == tally["rejected"], tally


def held(job: FaultJob) -> list[str]:
    """Images of the job whose message a worker holds unacknowledged (running, or reserved): kombu's `unacked`
    hash in the broker's Redis. After a kill -9 the dead worker's entries stay there until they are restored."""
    client = redis.Redis.from_url(job.env["BLOBSCORE_BROKER_URL"], socket_timeout=2)
    try:
        entries = client.hvals("unacked")
    finally:
        client.close()
    names = []
    for entry in entries:
        try:
            message = json.loads(entry)[0]
            task = json.loads(base64.b64decode(message["body"]))[0][0]
        except (ValueError, KeyError, IndexError, TypeError):
            continue  # not one of our JSON task messages (e.g. the pickle scenario's)
        if isinstance(task, dict) and task.get("job_id") == job.job_id:
            names.append(str(task["blob"]))
    return sorted(names)


def attempts_of(job: FaultJob, blob: str) -> int:
    """The unfinished-start count of one image (0 when none)."""
    client = redis.Redis.from_url(job.jobs_url, decode_responses=True, socket_timeout=2)
    try:
        value = client.get(f"{job.key_prefix}attempts:{job.job_id}:{blob}")
    finally:
        client.close()
    return int(value) if value else 0


def new_service_name() -> str:
    """A service name of the test's own: results prefix, breaker keys and stand-in route are all per test."""
    return f"faults-{uuid.uuid4().hex[:8]}"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --- a TCP proxy that can crash the worker at the worst moment ---------------------------------------------------


class KillOnResultWriteProxy:
    """Forwards 127.0.0.1:`port` to Azurite; when Azurite answers the first result upload, kills the worker first.

    So the result blob exists, but the worker never hears so: the job counter and the ack never happen — the
    exact "crash after the result upload, before the ack" window, hit deterministically.
    """

    def __init__(self, upstream_port: int, results_path: str) -> None:
        self._upstream_port = upstream_port
        self._marker = f"PUT {results_path}".encode()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.victim: ManagedProcess | None = None
        self.armed = threading.Event()
        self.fired = threading.Event()
        self.killed_at = 0.0
        self.written_result: str | None = None
        self._lock = threading.Lock()
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop accepting connections."""
        self._closing = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
            except OSError:
                client.close()
                continue
            state = {"result_put": b""}
            threading.Thread(target=self._pump_requests, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._pump_replies, args=(upstream, client, state), daemon=True).start()

    def _pump_requests(self, source: socket.socket, sink: socket.socket, state: dict[str, bytes]) -> None:
        try:
            while data := source.recv(65536):
                index = data.find(self._marker)
                if index >= 0 and self.armed.is_set():
                    state["result_put"] = data[index:].split(b" ", 2)[1]
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close_both(source, sink)

    def _pump_replies(self, source: socket.socket, sink: socket.socket, state: dict[str, bytes]) -> None:
        try:
            while data := source.recv(65536):
                if state["result_put"] and data.startswith(b"HTTP/1.1 201"):
                    with self._lock:
                        if self.armed.is_set() and not self.fired.is_set() and self.victim is not None:
                            self.killed_at = kill9(self.victim)
                            self.written_result = unquote(state["result_put"].decode())
                            self.fired.set()
                    state["result_put"] = b""
                    if self.fired.is_set():
                        return  # the reply dies with the worker
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close_both(source, sink)


def _close_both(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()
