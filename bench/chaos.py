"""A chaos run: minutes of random faults against real workers scoring real JPEGs, then one JSON report.

    .venv/bin/python bench/chaos.py --out /tmp/chaos.json      # 10 minutes of faults, ~12-17 minutes in all
    .venv/bin/python bench/chaos.py --duration 60 --images 300 --workers 2 --latency-ms 1500 --seed 12
    .venv/bin/python bench/chaos.py --duration 45 --kinds kill9_worker redis_restart --workdir /tmp/chaos

Not a test and not part of `make test`: tests/faults/test_chaos.py runs a 60-second version of the same code.

Everything is private and on 127.0.0.1, started the way the fault suite starts it (tests/faults/fault_helpers.py):
a redis-server (append-only, `appendfsync always`, its AOF never rewritten and time-stamped: the broker's flight
recorder), an Azurite keeping its data on disk with its access log on (how result writes are counted), a stand-in
scorer (`--no-model --emulate-latency-ms L`) and `python -m worker` processes (thread pool, concurrency 4) with the
fault suite's short timeouts but the production visibility timeout (240 s): a killed or paused worker's images can
only come back quickly through the leases (worker/leases.py). The Predict deadline is 5 s so that the "slow
scorer" fault is slowness, not an outage.

Work in flight all along: each job is a fresh container of small real JPEGs (shared_helpers.jpeg_bytes, distinct
bytes everywhere, so the stand-in's per-hash call counts are per image) plus six hostile files, one per rejection
code of the image check. The first job is --images (2,000) healthy images enqueued at the start; when the newest
job is nearly drained the next container is enqueued, sized to 60 % of what the measured rate finishes in the next
minute or before the faults end (at least twice what the workers hold at once), so the faults always strike while
images are in flight and little is left when they stop. Why not a Predict latency that makes 2,000 images last ten
minutes: 12 threads at ~200 ms score ~60 images/s (2,000 in ~35 s, not ten minutes); lasting ten minutes would take
a 3.6 s Predict, a handful of calls a second. With 0.5 s (at most 24 images/s, 4-10 measured under the faults on 2
shared cores) several thousand images go through the faults.

Faults, one at a time, a random pause (2-8 s) between them, everything drawn from one seeded generator:
kill -9 of a worker (a replacement is started at once, as a supervisor would), SIGSTOP of a worker for 5-25 s
then SIGCONT, a Redis restart (SIGTERM or SIGKILL, down 0.5-3 s, same port and directory), an Azurite restart
(SIGTERM, down 1-3 s, same port and data), a scorer outage (kill -9 of the stand-in, a new one on the same port
2-8 s later) and a slow scorer (the stand-in restarted with `--delay-ms 2500` for 10-30 s, then a normal one).
Redis and Azurite restarts never overlap an `enqueue` command: the producer is not under test here.

A supervisor thread restarts any worker that dies without our kill and records how it ended; a sampler watches
kombu's unacked index for messages held far longer than any live worker holds one. At the end: faults stop, every
job is awaited (at most 5 minutes after the last fault) and tallied as the fault suite does (lost: a listed image
with no current result whose message is neither queued nor unacknowledged; doubled: more than one result write in
Azurite's access log; rewritten: a result modified after its creation). For a lost image the report quotes every
broker command its messages went through (from the AOF), then `blobscore reconcile` is run on each unfinished job.
Exit code 1 on any failure in the report: lost or doubled images, a job not done in time, a run that went wrong.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The fault suite's helpers live next to its tests; a bench script puts them on the path itself.
for _path in (REPO, REPO / "tests", REPO / "tests" / "faults"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
import redis  # noqa: E402
from azure.core.exceptions import ResourceExistsError  # noqa: E402
from azure.storage.blob import BlobServiceClient  # noqa: E402
from fault_helpers import FaultJob, Processes, fault_env, kill9, start_standin, start_worker  # noqa: E402
from PIL import Image  # noqa: E402
from shared_helpers import jpeg_bytes, run_cli_json, settings_of  # noqa: E402

from deploy.local.azurite import connection_string, start_azurite  # noqa: E402
from deploy.local.procs import ManagedProcess, ProcessExitedError, free_port  # noqa: E402
from deploy.local.redis_local import ensure_redis_server_binary, redis_answers  # noqa: E402
from worker.jobs import JobStore  # noqa: E402
from worker.results import result_location  # noqa: E402

KINDS = ("kill9_worker", "sigstop_worker", "redis_restart", "azurite_restart", "scorer_outage", "scorer_slow")
# The production visibility timeout: recovery faster than this is the leases' work.
VISIBILITY_TIMEOUT_S = 240
# A Predict deadline above latency + the slow scorer's 2.5 s delay: "slow" must stay slow, not become an outage.
SCORING_TIMEOUT_S = 5
SLOW_SCORER_DELAY_MS = 2500
# Low enough that a 700 KB file is `too_large`; every healthy image here is ~4 KB.
MAX_IMAGE_BYTES = 300_000
# No live worker holds a message this long (a Predict is at most 5 s, a countdown 1 s, a SIGSTOP is reclaimed
# within ~20 s): one held longer belongs to nobody and waits for the visibility timeout.
STRANDED_AFTER_S = 60.0
# The lease publishes newly received delivery tags within about half a second (worker/leases.py): a kill -9 this
# soon after a delivery can leave that message unknown to every lease (README: "those few still come back through
# the visibility timeout"). A stranded message delivered this long or less before a kill -9 is that known window.
UNPUBLISHED_WINDOW_S = 1.0
# Jobs after the first get this share of what the measured rate would finish in the next FEED_HORIZON_S seconds.
FEED_SAFETY = 0.6
FEED_HORIZON_S = 60.0
# Markers in the workers' logs worth counting: what the leases did, and anything that looks like a crash.
LOG_MARKERS = ("requeued now", "taken over", "lost their acknowledgement", "held by no live worker",
               "when it died were put back", "connection dropped were put back", "could not put back",
               "Unrecoverable error", "Traceback", "CRITICAL", "too_many_attempts")
EXPECTED_CODES = {"bad/empty.jpg": "empty", "bad/text.jpeg": "not_an_image", "bad/png-named.jpg": "unsupported_format",
                  "bad/truncated.jpg": "truncated", "bad/claims-60000x60000.jpg": "too_many_pixels",
                  "bad/over-the-cap.jpg": "too_large"}


@dataclass
class ChaosConfig:
    """What one run does; the defaults are the ten-minute run."""

    duration_s: float = 600.0
    images: int = 2000
    workers: int = 3
    concurrency: int = 4
    latency_ms: float = 500.0
    seed: int = 1
    pause_s: tuple[float, float] = (2.0, 8.0)
    settle_timeout_s: float = 300.0
    recovery_target_s: float = 60.0
    kinds: tuple[str, ...] = KINDS
    workdir: Path | None = None


class Clock:
    """Seconds since the run started (every time in the report is one of these)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def of_wall(self, wall: float) -> float:
        """A wall-clock time (time.time()) on this clock."""
        return round(wall - time.time() + time.monotonic() - self.t0, 1)


# --- input --------------------------------------------------------------------------------------------------------


def healthy_images(job_number: int, count: int, seed: int) -> dict[str, bytes]:
    """`count` small real JPEGs; the seeds never repeat across jobs, so every image has its own bytes."""
    base = (seed * 1000 + job_number) * 100_000
    return {f"img/{index:05d}.jpg": jpeg_bytes(base + index, (96, 72)) for index in range(count)}


def hostile_images(job_number: int, seed: int) -> dict[str, bytes]:
    """One file per rejection code of the image check (named `bad/…`: listed before `img/…`, so never cut off by
    `enqueue --limit`). The fault suite's own corpus lives in a test module; this is a small copy of its idea."""
    small = jpeg_bytes(900_000_000 + seed * 1000 + job_number, (96, 72))  # no healthy image's seed
    noise = np.random.default_rng(seed * 1000 + job_number).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    files = {
        "bad/empty.jpg": b"",
        "bad/text.jpeg": f"not an image at all ({job_number})\n".encode(),
        "bad/png-named.jpg": _encoded(Image.fromarray(noise[:64, :64]), format="PNG"),
        "bad/truncated.jpg": small[: len(small) // 2],
        "bad/claims-60000x60000.jpg": _with_frame_size(small, 60000, 60000),
        "bad/over-the-cap.jpg": _encoded(Image.fromarray(noise), format="JPEG", quality=98),
    }
    assert set(files) == set(EXPECTED_CODES)
    assert len(files["bad/over-the-cap.jpg"]) > MAX_IMAGE_BYTES
    return files


def _encoded(image: Image.Image, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def _with_frame_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its SOF header claiming another size: rejected from the header, nothing decoded."""
    index = 2
    while index < len(jpeg):
        marker, length = jpeg[index + 1], int.from_bytes(jpeg[index + 2 : index + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            patched = bytearray(jpeg)
            patched[index + 5 : index + 7] = height.to_bytes(2, "big")
            patched[index + 7 : index + 9] = width.to_bytes(2, "big")
            return bytes(patched)
        index += 2 + length
    raise ValueError("no SOF marker")


# --- the stack ----------------------------------------------------------------------------------------------------


def start_durable_redis(port: int, data_dir: Path) -> ManagedProcess:
    """redis-server with every write fsynced before it is acknowledged: even a SIGKILL loses nothing acknowledged.

    (deploy.local.redis_local.start_redis has append-only but the default `everysec` fsync.)"""
    data_dir.mkdir(parents=True, exist_ok=True)
    # The AOF doubles as the broker's flight recorder: never rewritten (the history of every message stays in it)
    # and stamped with the time, so a lost image's messages can be traced command by command (aof_trace).
    argv = [ensure_redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir),
            "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--auto-aof-rewrite-percentage", "0",
            "--aof-timestamp-enabled", "yes", "--daemonize", "no", "--logfile", ""]
    process = ManagedProcess.start(argv, data_dir / "redis.log", cwd=data_dir)
    deadline = time.monotonic() + 30
    while not redis_answers(f"redis://127.0.0.1:{port}/0"):
        if not process.alive() or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"redis-server did not come up on {port}:\n{process.log_tail()}")
        time.sleep(0.05)
    return process


class Stack:
    """Redis, Azurite and the stand-in of one run, each restartable in place (same port, same data)."""

    def __init__(self, workdir: Path, procs: Processes, latency_ms: float, service: str) -> None:
        self.workdir, self.procs, self.latency_ms, self.service = workdir, procs, latency_ms, service
        self.redis_port, self.azurite_port, self.scorer_port = free_port(), free_port(), free_port()
        self.azurite_log = workdir / "azurite.log"
        self.stats_files: list[Path] = []  # one per stand-in started: FaultJob sums them per image hash
        self._scorers = 0
        self.redis = procs.track(start_durable_redis(self.redis_port, workdir / "redis"))
        self.azurite = procs.track(self._start_azurite())
        self.scorer = self.start_scorer()

    @property
    def broker_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def blob_connection_string(self) -> str:
        return connection_string(self.azurite_port)

    def _start_azurite(self) -> ManagedProcess:
        return start_azurite(self.azurite_port, self.azurite_log, self.workdir / "azurite-data", access_log=True)

    def start_scorer(self, *extra: str) -> ManagedProcess:
        """A stand-in on the run's port with its own stats file (the sum over all of them counts calls)."""
        self._scorers += 1
        tag = f"standin-{self._scorers}"
        stats = self.workdir / f"{tag}-stats.json"
        # Enough server threads that the stand-in never queues calls: every worker thread has one in flight.
        process = start_standin(self.procs, self.workdir, self.scorer_port, "--emulate-latency-ms",
                                str(self.latency_ms), "--workers", "64", *extra, stats_file=stats,
                                service=self.service, tag=tag)
        self.stats_files.append(stats)
        return process

    def restart_redis(self, how: str, down_s: float) -> None:
        if how == "kill9":
            self.redis.kill()
        else:
            self.redis.stop()  # TERM: Redis fsyncs its AOF and exits
        time.sleep(down_s)
        self.redis = self.procs.track(start_durable_redis(self.redis_port, self.workdir / "redis"))

    def restart_azurite(self, down_s: float) -> None:
        self.azurite.stop()  # TERM: Azurite closes its connections and saves its metadata
        time.sleep(down_s)
        self.azurite = self.procs.track(self._start_azurite())

    def scorer_outage(self, down_s: float) -> None:
        kill9(self.scorer)
        time.sleep(down_s)
        self.scorer = self.start_scorer()

    def slow_scorer(self, slow_s: float) -> None:
        self.scorer.stop()
        self.scorer = self.start_scorer("--delay-ms", str(SLOW_SCORER_DELAY_MS))
        time.sleep(slow_s)
        self.scorer.stop()
        self.scorer = self.start_scorer()


# --- workers and their supervisor ---------------------------------------------------------------------------------


@dataclass
class Slot:
    """One supervised worker position: its current process and how many it has had."""

    number: int
    process: ManagedProcess
    generation: int = 1


class Workers:
    """The worker processes, a supervisor that restarts any that dies, and the record of deaths we did not cause."""

    def __init__(self, procs: Processes, env: dict[str, str], workdir: Path, config: ChaosConfig,
                 clock: Clock) -> None:
        self.procs, self.env, self.workdir, self.config, self.clock = procs, env, workdir, config, clock
        self.lock = threading.RLock()  # a kill-and-replace and a supervisor restart never interleave
        self.exits: list[dict[str, Any]] = []
        self.start_failures: list[dict[str, Any]] = []
        self.logs: list[Path] = []
        self.slots = [Slot(number, self._start(number, 1)) for number in range(1, config.workers + 1)]

    def _start(self, number: int, generation: int) -> ManagedProcess:
        """Start a worker; a start that fails (the broker restarting, say) is recorded and tried again."""
        for attempt in range(1, 4):
            log = self.workdir / f"worker-{number}-{generation}{'' if attempt == 1 else f'-try{attempt}'}.log"
            self.logs.append(log)
            try:
                return start_worker(self.procs, self.env, log, concurrency=self.config.concurrency)
            except (TimeoutError, ProcessExitedError) as exc:
                self.start_failures.append({"slot": number, "at_s": self.clock.now(), "error": str(exc)[-600:]})
        raise RuntimeError(f"worker slot {number} would not start three times in a row")

    def kill9_and_replace(self, index: int) -> dict[str, Any]:
        with self.lock:
            slot = self.slots[index % len(self.slots)]
            pid = slot.process.pid
            kill9(slot.process)
            killed_at = self.clock.now()
            slot.generation += 1
            slot.process = self._start(slot.number, slot.generation)
            return {"slot": slot.number, "pid": pid, "killed_at_s": killed_at, "replacement_ready_s": self.clock.now()}

    def pause(self, index: int, seconds: float) -> dict[str, Any]:
        """SIGSTOP then SIGCONT one worker (alone: a stopped process is alive, the supervisor leaves it be)."""
        with self.lock:
            slot = self.slots[index % len(self.slots)]
            process = slot.process
        os.kill(process.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
        return {"slot": slot.number, "pid": process.pid, "stopped_s": round(seconds, 1)}

    def supervise_once(self) -> None:
        """Restart every worker that is gone without our kill, and remember how it ended."""
        with self.lock:
            for slot in self.slots:
                if slot.process.alive():
                    continue
                self.exits.append(_exit_record(slot, self.clock))
                slot.generation += 1
                slot.process = self._start(slot.number, slot.generation)

    def resume_all(self) -> None:
        """SIGCONT everything (a run interrupted mid-pause must not leave a stopped process behind)."""
        for slot in self.slots:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.process.pid, signal.SIGCONT)

    def log_markers(self) -> dict[str, int]:
        text = "".join(log.read_text(errors="replace") for log in self.logs if log.exists())
        return {marker: text.count(marker) for marker in LOG_MARKERS}


def _exit_record(slot: Slot, clock: Clock) -> dict[str, Any]:
    """How a worker that nobody killed ended: exit status, the last lines it logged, and its last CRITICAL line
    with the end of the traceback that follows it (the reason, when Celery gave one)."""
    lines = slot.process.log.read_text(errors="replace").splitlines() if slot.process.log.exists() else []
    critical = [index for index, line in enumerate(lines) if " CRITICAL " in line]
    reason: list[str] = []
    if critical:
        following = lines[critical[-1]:]
        end = next((index for index, line in enumerate(following[1:], 1) if line[:4].isdigit()), len(following))
        reason = [following[0], *following[max(1, end - 24):end]]
    return {"slot": slot.number, "pid": slot.process.pid, "at_s": clock.now(),
            "returncode": slot.process.returncode, "log": str(slot.process.log),
            "unrecoverable_error": any("Unrecoverable error" in lines[index] for index in critical),
            "critical": [line.strip() for line in reason if line.strip() and set(line.strip()) != {"^"}],
            "log_tail": lines[-6:]}


# --- jobs ---------------------------------------------------------------------------------------------------------


@dataclass
class ChaosJob(FaultJob):
    """A FaultJob of the chaos run: its number and end, results read once, and a result-name lookup that is one
    dict (the helper's rebuilds it per name: O(n²) on 2,000 images)."""

    number: int = 0
    done_at: float | None = None
    enqueue_error: str | None = None
    _sources: dict[str, str] = field(default_factory=dict)
    _results: dict[str, dict[str, Any]] | None = None

    def source_of(self, result_blob: str) -> str:
        if len(self._sources) != len(self.uploads):
            self._sources = {result_location(self.results_prefix, name)[0]: name for name in self.uploads}
        return self._sources.get(result_blob, result_blob[len(self.results_prefix):-len(".json")])

    def counted_all(self, part: str) -> list[str]:
        """The names the job record lists (`listed`) or counts (`ok`, `rejected`)."""
        assert self.job_id is not None
        store = self.jobs()
        try:
            return list(store.members(self.job_id, part))  # type: ignore[arg-type]
        finally:
            store.close()

    def rewritten(self) -> list[str]:
        """Images whose result blob was modified after it was created (to the second): a second successful write,
        seen from Azurite's own timestamps: a check of "written once" that does not need the access log, which
        can miss the line of a request answered just before a restart."""
        container = self.blob_service.get_container_client(self.container)
        return sorted(self.source_of(item.name) for item in container.list_blobs(name_starts_with=self.results_prefix)
                      if item.last_modified != item.creation_time)

    def results(self) -> dict[str, dict[str, Any]]:
        """Read once, at the end (the tally and the rejection check both need them)."""
        if self._results is None:
            self._results = super().results()
        return self._results


def upload_all(blob_service: BlobServiceClient, container: str, blobs: dict[str, bytes]) -> None:
    """Create the container and upload `blobs`, each retried through Azurite restarts (8 at a time)."""
    _retrying(lambda: _create_container(blob_service, container))
    client = blob_service.get_container_client(container)

    def upload(name: str, data: bytes) -> None:
        _retrying(lambda: client.upload_blob(name, data, overwrite=True))

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(upload, name, data) for name, data in blobs.items()]:
            future.result()


def _create_container(blob_service: BlobServiceClient, container: str) -> None:
    with contextlib.suppress(ResourceExistsError):  # created by an attempt whose reply was lost
        blob_service.create_container(container)


def _retrying(action: Callable[[], Any], timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return action()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Feeder(threading.Thread):
    """Keeps work in flight: the next container is uploaded ahead and enqueued when the newest job is nearly
    drained, sized so that little is left when the faults end (`_next_size`)."""

    def __init__(self, make_job: Callable[[int, int], ChaosJob], storage_lock: threading.Lock, config: ChaosConfig,
                 clock: Clock, faults_end_at: float) -> None:
        super().__init__(name="chaos-feeder", daemon=True)
        self.make_job, self.storage_lock, self.config, self.clock = make_job, storage_lock, config, clock
        self.faults_end_at = faults_end_at
        self.jobs: list[ChaosJob] = []
        self.stop_event = threading.Event()
        self.error: str | None = None

    def enqueue(self, job: ChaosJob, limit: int) -> None:
        """`blobscore enqueue` with no Redis or Azurite restart meanwhile (the producer is not under test)."""
        with self.storage_lock:
            try:
                job.enqueue("--limit", str(limit))
            except Exception as exc:  # recorded; the container is left out rather than enqueued twice
                job.enqueue_error = str(exc)[-600:]
        self.jobs.append(job)

    def run(self) -> None:
        try:
            self._feed()
        except Exception as exc:  # reported, never raised in a thread
            self.error = repr(exc)

    def _feed(self) -> None:
        """Until the faults end (the last one may run past --duration): upload the next container (as large as
        the next job could be), wait, enqueue it cut to the size wanted now."""
        number = len(self.jobs) + 1
        while not self.stop_event.is_set():
            upcoming = self.make_job(number, self._next_size())
            if not self._wait_until_nearly_drained() or self.stop_event.is_set():
                return
            prepared = len(upcoming.uploads) - len(EXPECTED_CODES)
            self.enqueue(upcoming, len(EXPECTED_CODES) + min(self._next_size(), prepared))
            number += 1
            if sum(job.enqueue_error is not None for job in self.jobs[-3:]) == 3:
                self.error = "three enqueues in a row failed; feeding stopped"
                return

    def _wait_until_nearly_drained(self) -> bool:
        """Until the newest enqueued job has no more images waiting than the workers hold at once."""
        low_water = self.config.workers * self.config.concurrency
        while not self.stop_event.wait(0.5):
            current = self.jobs[-1]
            if current.job_id is None or current.done_at is not None:
                return True
            with contextlib.suppress(Exception):  # Redis restarting: ask again
                status = current.status()
                if status["state"] != "listing" and status["pending"] <= low_water:
                    return True
        return False

    def _next_size(self) -> int:
        """Healthy images for the next job: 60 % of what the rate so far would finish in the next minute, or before
        the faults end if that is sooner; at least a top-up of twice what the workers hold at once (a few seconds
        of work). The rate swings with the faults (a slow scorer spell divides it by six) and with the machine's
        load, so jobs are short and sized low: a job that ends early is followed by another; one sized for the
        whole remaining time would, at a lower rate, leave a backlog at the last fault that the time from the
        last fault to the last job's end would mistake for a slow recovery."""
        top_up = 2 * self.config.workers * self.config.concurrency
        left_s = self.faults_end_at - time.monotonic()
        finished = sum(_finished(job) for job in self.jobs)
        elapsed = time.monotonic() - min(job.enqueued_at for job in self.jobs)
        rate = finished / elapsed if elapsed > 0 else 0.0  # images per second, faults included
        if rate <= 0:
            return self.config.images
        return max(top_up, min(self.config.images, int(FEED_SAFETY * rate * min(left_s, FEED_HORIZON_S))))


def _finished(job: ChaosJob) -> int:
    if job.job_id is None:
        return 0
    try:
        status = job.status()
    except Exception:
        return job.listed if job.done_at is not None else 0
    return int(status["ok"]) + int(status["rejected"])


class Supervisor(threading.Thread):
    """What systemd or Kubernetes would do: restart a worker that is gone, every half second."""

    def __init__(self, workers: Workers) -> None:
        super().__init__(name="chaos-supervisor", daemon=True)
        self.workers = workers
        self.stop_event = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            try:
                self.workers.supervise_once()
            except Exception as exc:  # a slot that would not start three times: reported, and tried again
                self.error = repr(exc)


class Tracker(threading.Thread):
    """Every half second: when each job became done, and messages held by nobody."""

    def __init__(self, feeder: Feeder, broker_url: str, key_prefix: str, clock: Clock) -> None:
        super().__init__(name="chaos-tracker", daemon=True)
        self.feeder, self.clock = feeder, clock
        self.broker = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
        self.store = JobStore.from_url(broker_url, key_prefix)
        self.stop_event = threading.Event()
        self.stranded: dict[str, dict[str, Any]] = {}
        self.errors: Counter[str] = Counter()

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            for step in (self._note_done_jobs, self._watch_unacked):
                try:
                    step()
                except Exception as exc:  # Redis restarting, mostly: counted, tried again next round
                    self.errors[type(exc).__name__] += 1
        self.broker.close()
        self.store.close()

    def _note_done_jobs(self) -> None:
        for job in list(self.feeder.jobs):
            if job.job_id is not None and job.done_at is None and self.store.status(job.job_id).state == "done":
                job.done_at = time.monotonic()

    def _watch_unacked(self) -> None:
        """Messages unacknowledged for longer than any live worker holds one: nobody will act on them before the
        visibility timeout. Recorded with their image and when they were delivered and finally released."""
        now_wall, now = time.time(), self.clock.now()
        index = dict(self.broker.zrange("unacked_index", 0, -1, withscores=True))
        for tag, delivered in index.items():
            key = tag.decode()
            if now_wall - delivered > STRANDED_AFTER_S and key not in self.stranded:
                self.stranded[key] = {"tag": key, "image": self._image_of(tag),
                                      "delivered_at_s": round(now - (now_wall - delivered), 1), "seen_at_s": now}
        for key, entry in self.stranded.items():
            if "released_at_s" not in entry and key.encode() not in index:
                entry["released_at_s"] = now
                entry["held_s"] = round(now - entry["delivered_at_s"], 1)

    def _image_of(self, tag: bytes) -> str | None:
        raw = self.broker.hget("unacked", tag)
        task = _task_of(json.loads(raw)[0]) if raw else None
        return f"{task['container']}/{task['blob']}" if task else None


# --- faults -------------------------------------------------------------------------------------------------------


@dataclass
class Planned:
    """One fault as drawn from the seeded generator (what happens is fixed by the seed; when, by the run)."""

    kind: str
    worker: int
    seconds: float
    how: str


# Seconds each kind lasts, drawn uniformly: a pause, a service's downtime, a slow spell.
SECONDS = {"kill9_worker": (0.0, 0.0), "sigstop_worker": (5.0, 25.0), "redis_restart": (0.5, 3.0),
           "azurite_restart": (1.0, 3.0), "scorer_outage": (2.0, 8.0), "scorer_slow": (10.0, 30.0)}


def draw_fault(rng: random.Random, kinds: tuple[str, ...]) -> Planned:
    """The same four draws whatever the kind, so a given seed always gives the same sequence of faults."""
    kind, worker, fraction, how = rng.choice(kinds), rng.randrange(1000), rng.random(), rng.choice(("term", "kill9"))
    low, high = SECONDS[kind]
    return Planned(kind, worker, round(low + fraction * (high - low), 1), how if kind == "redis_restart" else "")


def inject(planned: Planned, stack: Stack, workers: Workers, storage_lock: threading.Lock) -> dict[str, Any]:
    """Do one fault to its end (a paused worker resumed, a restarted service answering); its details."""
    if planned.kind == "kill9_worker":
        return workers.kill9_and_replace(planned.worker)
    if planned.kind == "sigstop_worker":
        return workers.pause(planned.worker, planned.seconds)
    if planned.kind == "redis_restart":
        with storage_lock:
            stack.restart_redis(planned.how, planned.seconds)
        return {"how": planned.how, "down_s": planned.seconds}
    if planned.kind == "azurite_restart":
        with storage_lock:
            stack.restart_azurite(planned.seconds)
        return {"down_s": planned.seconds}
    if planned.kind == "scorer_outage":
        stack.scorer_outage(planned.seconds)
        return {"down_s": planned.seconds}
    stack.slow_scorer(planned.seconds)
    return {"slow_s": planned.seconds, "delay_ms": SLOW_SCORER_DELAY_MS}


def run_faults(config: ChaosConfig, stack: Stack, workers: Workers, storage_lock: threading.Lock, clock: Clock,
               until: float) -> list[dict[str, Any]]:
    """Faults one after the other, a random pause between them, until `until` (none starts after it)."""
    rng = random.Random(config.seed)
    events: list[dict[str, Any]] = []
    while time.monotonic() < until:
        planned = draw_fault(rng, config.kinds)
        started = clock.now()
        detail = inject(planned, stack, workers, storage_lock)
        events.append({"n": len(events) + 1, "kind": planned.kind, "at_s": started, "ended_s": clock.now(), **detail})
        pause = rng.uniform(*config.pause_s)
        time.sleep(max(0.0, min(pause, until - time.monotonic())))
    return events


# --- the run ------------------------------------------------------------------------------------------------------


def run_chaos(config: ChaosConfig) -> dict[str, Any]:
    """Start the stack, run the faults while jobs are fed, wait for every job, tally; the report."""
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="blobscore-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    procs, clock = Processes(), Clock()
    workers: Workers | None = None
    try:
        service = f"chaos-{uuid.uuid4().hex[:8]}"
        stack = Stack(workdir, procs, config.latency_ms, service)
        env = fault_env(broker_url=stack.broker_url, blob_connection_string=stack.blob_connection_string,
                        scoring_port=stack.scorer_port, service=service, extra={
                            "BLOBSCORE_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
                            "BLOBSCORE_SCORING_TIMEOUT_S": str(SCORING_TIMEOUT_S),
                            "BLOBSCORE_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES)})
        with BlobServiceClient.from_connection_string(stack.blob_connection_string) as blob_service:
            make_job = _job_maker(config, workdir, env, blob_service, stack, service)
            first = make_job(1, config.images)
            workers = Workers(procs, env, workdir, config, clock)
            return _run(config, stack, workers, make_job, first, clock, workdir)
    finally:
        if workers is not None:
            workers.resume_all()
        procs.stop_all()


def _job_maker(config: ChaosConfig, workdir: Path, env: dict[str, str], blob_service: BlobServiceClient,
               stack: Stack, service: str) -> Callable[[int, int], ChaosJob]:
    def make(number: int, healthy: int) -> ChaosJob:
        job = ChaosJob(scenario=f"chaos-job-{number}", workdir=workdir, env=env, blob_service=blob_service,
                       container=f"chaos-{number:02d}-{uuid.uuid4().hex[:8]}", service=service,
                       azurite_log=stack.azurite_log, stats_files=stack.stats_files, number=number)
        blobs = {**hostile_images(number, config.seed), **healthy_images(number, healthy, config.seed)}
        upload_all(blob_service, job.container, blobs)
        job.uploads.update(blobs)
        return job
    return make


def _run(config: ChaosConfig, stack: Stack, workers: Workers, make_job: Callable[[int, int], ChaosJob],
         first: ChaosJob, clock: Clock, workdir: Path) -> dict[str, Any]:
    storage_lock = threading.Lock()
    setup_s = clock.now()
    clock.t0 = time.monotonic()  # every time in the report counts from the first enqueue
    feeder = Feeder(make_job, storage_lock, config, clock, time.monotonic() + config.duration_s)
    feeder.enqueue(first, config.images + len(EXPECTED_CODES))
    tracker, supervisor = Tracker(feeder, stack.broker_url, first.key_prefix, clock), Supervisor(workers)
    for thread in (tracker, supervisor):
        thread.start()
    # The first fault strikes once images are flowing, not while the workers receive their first messages.
    with contextlib.suppress(Exception):
        _wait_for(lambda: _finished(first) >= 2 * config.workers * config.concurrency, 60)
    faults_end_at = feeder.faults_end_at = time.monotonic() + config.duration_s
    feeder.start()
    events = run_faults(config, stack, workers, storage_lock, clock, faults_end_at)
    last_fault_end = time.monotonic()
    backlog = _backlog(feeder.jobs)
    feeder.stop_event.set()
    feeder.join(timeout=180)  # it may be uploading a container it will not enqueue
    all_done = _wait_all_done(feeder.jobs, last_fault_end + config.settle_timeout_s)
    time.sleep(5)  # a worker paused near the end finishes its in-flight images now: their writes must meet 409s
    for thread in (tracker, supervisor):
        thread.stop_event.set()
        thread.join(timeout=100)
    report = build_report(config, clock, workdir, feeder, tracker, supervisor, workers, events, last_fault_end,
                          all_done)
    return {**report, "images_pending_at_last_fault": backlog, "setup_s": setup_s}


def _backlog(jobs: list[ChaosJob]) -> int | None:
    """Images not yet finished when the last fault ended: what the workers still had to do, faults or not."""
    try:
        return sum(int(job.status()["pending"]) for job in jobs if job.job_id is not None)
    except Exception:
        return None


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)


def _wait_all_done(jobs: list[ChaosJob], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if all(job.done_at is not None for job in jobs if job.job_id is not None):
            return True
        time.sleep(0.5)
    return False


# --- the report ---------------------------------------------------------------------------------------------------


def job_summary(job: ChaosJob, clock: Clock) -> dict[str, Any]:
    """The fault suite's tally of one job, trimmed to what the report shows."""
    if job.job_id is None:
        return {"job": job.number, "container": job.container, "enqueue_error": job.enqueue_error}
    tally = job.tally()
    codes = {name: doc["error"]["code"] for name, doc in job.results().items() if doc["status"] == "rejected"}
    # A healthy image rejected (too_many_attempts after many redeliveries, retries_exhausted) or a hostile one
    # rejected for another reason than its own.
    unexpected = {name: code for name, code in codes.items() if EXPECTED_CODES.get(name) != code}
    # A job not done yet: its images without a result are lost only if their message is gone too (neither queued
    # nor unacknowledged: nothing will ever bring them back but `blobscore reconcile`).
    unfinished: dict[str, str] = {}
    if tally["status"]["state"] != "done":
        unfinished = whereabouts(job, job.jobs_url, settings_of(job.env).queue_for(job.service))
    lost = [name for name in tally["lost_names"] if unfinished.get(name, "nowhere") == "nowhere"]
    return {
        "job": job.number, "job_id": job.job_id, "container": job.container,
        "listed": tally["listed"], "ok": tally["ok"], "rejected": tally["rejected"],
        "rejected_codes": tally["rejected_codes"], "unexpected_rejections": unexpected,
        "lost": len(lost), "lost_names": lost[:20],
        "doubled": tally["doubled"], "doubled_names": tally["doubled_names"][:20],
        "result_writes": tally["result_writes"], "unlogged_writes": tally["unlogged_writes"],
        "rewritten_results": job.rewritten()[:20],
        "scorer_calls_per_image": tally["scorer_calls_per_image"], "scorer_calls_max": tally["scorer_calls_max"],
        "scorer_calls_total": tally["scorer_calls_total"],
        "state": tally["status"]["state"], "unfinished_by_place": dict(Counter(unfinished.values())),
        "unfinished": dict(list(unfinished.items())[:50]),
        "enqueued_at_s": round(job.enqueued_at - clock.t0, 1),
        "done_at_s": None if job.done_at is None else round(job.done_at - clock.t0, 1),
    }


def build_report(config: ChaosConfig, clock: Clock, workdir: Path, feeder: Feeder, tracker: Tracker,
                 supervisor: Supervisor, workers: Workers, events: list[dict[str, Any]], last_fault_end: float,
                 all_done: bool) -> dict[str, Any]:
    jobs = [job_summary(job, clock) for job in feeder.jobs]
    tallied = [job for job in jobs if "listed" in job]
    # The evidence first (the broker's history of each lost image), then the repair the product offers.
    lost_images = {(job["container"], name) for job in tallied for name in job["lost_names"]}
    traces = aof_trace(workdir / "redis", lost_images, clock) if lost_images else {}
    for summary, job in zip(jobs, feeder.jobs, strict=True):
        if job.job_id is not None and summary.get("state") != "done":
            summary["after_reconcile"] = reconcile(job)
    done_times = [job.done_at for job in feeder.jobs if job.done_at is not None]
    last_done = max(done_times) if done_times else None
    recovery = None if last_done is None or not all_done else round(last_done - last_fault_end, 1)
    lost, doubled = sum(job["lost"] for job in tallied), sum(job["doubled"] for job in tallied)
    failures = [reason for reason, failed in (
        ("lost > 0", lost > 0), ("doubled > 0", doubled > 0),
        ("results rewritten", any(job["rewritten_results"] for job in tallied)),
        (f"jobs not done within {config.settle_timeout_s:.0f} s of the last fault", not all_done),
        ("an enqueue failed", len(tallied) < len(jobs)), (f"feeder: {feeder.error}", feeder.error is not None),
        (f"supervisor: {supervisor.error}", supervisor.error is not None),
    ) if failed]
    stranded = sorted(tracker.stranded.values(), key=lambda entry: entry["delivered_at_s"])
    explain_strands(stranded, events)
    return {
        "config": {**{key: value for key, value in asdict(config).items() if key != "workdir"},
                   "visibility_timeout_s": VISIBILITY_TIMEOUT_S, "scoring_timeout_s": SCORING_TIMEOUT_S},
        "workdir": str(workdir),
        "verdict": "fail" if failures else "pass",
        "failures": failures,
        "totals": _totals(tallied),
        "last_fault_ended_at_s": round(last_fault_end - clock.t0, 1),
        "last_job_done_at_s": None if last_done is None else round(last_done - clock.t0, 1),
        "last_fault_to_last_job_end_s": recovery,
        "recovery_target_s": config.recovery_target_s,
        "recovery_within_target": recovery is not None and recovery <= config.recovery_target_s,
        "faults": {"total": len(events), "by_kind": dict(Counter(event["kind"] for event in events)),
                   "events": events},
        "worker_exits_not_caused_by_us": workers.exits,
        "worker_start_failures": workers.start_failures,
        "worker_log_markers": workers.log_markers(),
        "stranded_messages": stranded,
        "lost_image_broker_history": traces,
        "stranded_all_in_unpublished_window": all(entry["kill9_after_delivery_s"] is not None for entry in stranded),
        "tracker_errors": dict(tracker.errors),
        "jobs": jobs,
        "wall_s": clock.now(),
    }


def explain_strands(stranded: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    """Stamp each stranded message with how soon after its delivery a worker was killed (None: no kill -9 within
    UNPUBLISHED_WINDOW_S of it, so the known window does not explain it)."""
    kills = [event["killed_at_s"] for event in events if event["kind"] == "kill9_worker"]
    for entry in stranded:
        gaps = [kill - entry["delivered_at_s"] for kill in kills
                if -0.2 <= kill - entry["delivered_at_s"] <= UNPUBLISHED_WINDOW_S]  # times are rounded to 0.1 s
        entry["kill9_after_delivery_s"] = round(min(gaps), 1) if gaps else None


def whereabouts(job: ChaosJob, broker_url: str, queue: str) -> dict[str, str]:
    """For a job that is not done: where each image it has not counted is now (queued, unacknowledged, or
    nowhere, i.e. its message is gone)."""
    missing = set(job.counted_all("listed")) - set(job.counted_all("ok")) - set(job.counted_all("rejected"))
    client = redis.Redis.from_url(broker_url, socket_timeout=5)
    try:
        places: dict[str, str] = {}
        for key in client.scan_iter(match=f"{queue}*"):
            if client.type(key) == b"list":
                places.update({blob: "queued" for blob in map(_blob_of, client.lrange(key, 0, -1)) if blob})
        for raw in client.hvals("unacked"):
            task = _task_of(json.loads(raw)[0])
            if task:
                places[str(task["blob"])] = "unacknowledged"
    finally:
        client.close()
    return {name: places.get(name, "nowhere") for name in sorted(missing)}


def _blob_of(raw: bytes) -> str | None:
    """The blob a queued kombu message (JSON) is about, if it is one of our image tasks."""
    try:
        task = _task_of(json.loads(raw))
    except ValueError:
        return None
    return str(task["blob"]) if task else None


def _task_of(message: Any) -> dict[str, Any] | None:
    """Our ImageTask dict inside a kombu message (its body: base64 JSON of [args, kwargs, embed])."""
    try:
        task = json.loads(base64.b64decode(message["body"]))[0][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return task if isinstance(task, dict) and "blob" in task and "container" in task else None


def aof_trace(redis_dir: Path, images: set[tuple[str, str]], clock: Clock, limit: int = 60) -> dict[str, Any]:
    """Every broker command that touched a message of each (container, blob), from the never-rewritten AOF: its
    publications and restores (LPUSH/RPUSH), deliveries (HSET/ZADD unacked), acks and restores (HDEL/ZREM), and the
    leases that published it (SADD held:<worker>). BRPOP is logged by Redis as a bare RPOP of the queue, which
    names no message: a delivery shows as its HSET, and a message popped but never recorded shows as nothing."""
    commands = list(_aof_commands(redis_dir / "appendonlydir"))
    tags: dict[str, tuple[str, str]] = {}
    for _, args in commands:
        for payload in args[2:]:
            task, tag = _message_of(payload)
            if task is not None and (task["container"], task["blob"]) in images and tag:
                tags[tag] = (task["container"], task["blob"])
    trace: dict[str, list[dict[str, Any]]] = {f"{container}/{blob}": [] for container, blob in images}
    for wall, args in commands:
        tag = _tag_in(args, tags)
        if tag is not None:
            container, blob = tags[tag]
            trace[f"{container}/{blob}"].append({
                "at_s": clock.of_wall(wall) if wall else None, "cmd": args[0].decode().upper(),
                "key": _short_key(args[1].decode(errors="replace")), "tag": tag[:8]})
    return {image: entries[-limit:] for image, entries in trace.items()}


def _short_key(key: str) -> str:
    """`unacked`, `queue`, `held:<worker id>` (the lease that published the tag), ..."""
    if ":held:" in key:
        return "held:" + key.rsplit(":", 1)[1]
    return "queue" if "." in key and ":" not in key else key


def _tag_in(args: list[bytes], tags: dict[str, tuple[str, str]]) -> str | None:
    """The traced delivery tag a command names, as an argument (HDEL, ZREM, ZADD) or inside a message it stores."""
    for arg in args[1:]:
        if len(arg) == 36 and arg.decode(errors="replace") in tags:
            return arg.decode()
    for payload in args[2:]:
        _, tag = _message_of(payload)
        if tag in tags:
            return tag
    return None


def _aof_commands(directory: Path) -> Iterator[tuple[float, list[bytes]]]:
    """(time of its #TS annotation, arguments) of every command in the AOF's incremental files, in order."""
    manifest = (directory / "appendonly.aof.manifest").read_text().split("\n")
    files = [line.split()[1] for line in manifest if line.endswith("type i")]
    wall = 0.0
    for name in files:
        data, pos = (directory / name).read_bytes(), 0
        while pos < len(data):
            end = data.index(b"\r\n", pos)
            line, pos = data[pos:end], end + 2
            if line.startswith(b"#TS:"):
                wall = float(line[4:])
            elif line.startswith(b"*"):
                args = []
                for _ in range(int(line[1:])):
                    end = data.index(b"\r\n", pos)
                    size = int(data[pos + 1:end])
                    args.append(data[end + 2:end + 2 + size])
                    pos = end + 4 + size
                yield wall, args


def _message_of(payload: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(our task, delivery tag) of a kombu message as the broker stores it (queued: the message; unacked: a list
    [message, exchange, routing key]); (None, None) for anything else."""
    if not payload.startswith((b"{", b"[")) or b"delivery_tag" not in payload:
        return None, None
    try:
        message = json.loads(payload)
        message = message[0] if isinstance(message, list) else message
        return _task_of(message), str(message["properties"]["delivery_tag"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None, None


def reconcile(job: ChaosJob, timeout_s: float = 60.0) -> dict[str, Any]:
    """What the product offers for a stuck job: `blobscore reconcile JOB` re-queues every image with neither a
    result nor an outcome; then the job should end. (Run after the tally, so the report still counts the loss.)"""
    assert job.job_id is not None
    try:
        output = run_cli_json(job.env, job.workdir, "reconcile", job.job_id)
    except Exception as exc:  # the command itself failed: reported as such
        return {"error": str(exc)[-400:]}
    started = time.monotonic()
    _wait_for(lambda: job.status()["state"] == "done", timeout_s)
    return {"reconcile": output, "state_after": job.status()["state"], "waited_s": round(time.monotonic() - started, 1)}


def _totals(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    codes: Counter[str] = Counter()
    for job in jobs:
        codes.update(job["rejected_codes"])
    listed = sum(job["listed"] for job in jobs)
    calls = sum(job["scorer_calls_total"] for job in jobs)
    return {
        "jobs": len(jobs), "listed": listed, "ok": sum(job["ok"] for job in jobs),
        "rejected": sum(job["rejected"] for job in jobs), "rejected_codes": dict(sorted(codes.items())),
        "unexpected_rejections": sum(len(job["unexpected_rejections"]) for job in jobs),
        "lost": sum(job["lost"] for job in jobs), "doubled": sum(job["doubled"] for job in jobs),
        "unlogged_writes": sum(job["unlogged_writes"] for job in jobs),
        "rewritten_results": sum(len(job["rewritten_results"]) for job in jobs),
        "scorer_calls_per_image_avg": round(calls / listed, 3) if listed else 0.0,
        "scorer_calls_per_image_max": max((job["scorer_calls_max"] for job in jobs), default=0),
    }


def exit_code(report: dict[str, Any]) -> int:
    """1 when anything was lost or doubled, a job did not finish within the settle timeout, or the run itself
    went wrong (an enqueue failed, a worker slot would not start): every failure in the report."""
    return 1 if report["failures"] else 0


def parse_args(argv: list[str] | None = None) -> tuple[ChaosConfig, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of faults (default 600)")
    parser.add_argument("--images", type=int, default=2000, help="healthy images per container (default 2000)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    parser.add_argument("--concurrency", type=int, default=4, help="threads per worker (default 4)")
    parser.add_argument("--latency-ms", type=float, default=500.0, help="stand-in Predict latency (default 500)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault sequence and the images")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="fault kinds to draw from")
    parser.add_argument("--workdir", type=Path, help="keep logs and data here (default: a new /tmp directory)")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    config = ChaosConfig(duration_s=args.duration, images=args.images, workers=args.workers,
                         concurrency=args.concurrency, latency_ms=args.latency_ms, seed=args.seed,
                         kinds=tuple(args.kinds), workdir=args.workdir)
    return config, args.out


def main(argv: list[str] | None = None) -> int:
    config, out = parse_args(argv)
    report = run_chaos(config)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
    return exit_code(report)


if __name__ == "__main__":
    sys.exit(main())
