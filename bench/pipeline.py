"""End-to-end benchmark of blobscore on a private local stack; prints one JSON object per scenario, then a summary.

    .venv/bin/python bench/pipeline.py --quick          # ~3 minutes on 2 cores
    .venv/bin/python bench/pipeline.py                  # the full matrix, ~10 minutes on 2 cores
    .venv/bin/python bench/pipeline.py --latencies 60 --processes 1 --inflight 32 --skip-redis-job
    .venv/bin/python bench/pipeline.py --corpus photos --latencies 60 --processes 1 --inflight 32 --skip-redis-job

Two corpora, uploaded once and read by every scenario (--corpus photos|tiny|both, default both):
 * photos — the main scenario: camera-sized JPEGs (bench/photo_corpus.py: 1.2-12 MP, 0.11-6 MB, mean ~1.1 MB,
   seeded, cached under ~/.cache/blobscore/bench-photos), every photo scenario scores all --photos of them;
 * tiny — ~3.5 KB crops of the sample photos, as earlier runs used: only the per-call costs, comparable with
   the earlier figures; n = min(--images, max(200, 20·P·C)) per scenario.

Not a test: the suite never runs it. It drives the product only through its public entry points — `python -m
worker` and `python -m producer.cli enqueue|status` processes with BLOBSCORE_* environment — so it measures whatever
the code is when it runs. Everything it starts is private and on 127.0.0.1: a Redis on a free port (no
persistence), an in-memory Azurite, one stand-in scorer per latency (`--no-model --emulate-latency-ms N`, enough
`--workers` never to be the bottleneck), and, for the 200,000-image job, a synthetic Blob listing endpoint.

Per worker scenario (corpus, scorer latency L ms, P worker processes, C images in flight per process):
 1. `blobscore enqueue --limit n --results-container <fresh> --results-prefix <scenario>/ --json` with no worker
    running (the queue is prefilled: its messages map Celery task ids to blobs, and start-up to first task is
    measured the way a scaled-up worker meets a waiting queue);
 2. P `python -m worker` processes start at once (BLOBSCORE_WORKER_CONCURRENCY=C); the run ends when
    `JobStore.status` says done (polled every 50 ms).

Keys (every time is wall clock on this machine, every CPU figure from /proc/<pid>/stat utime+stime, plus
cutime+cstime and live descendants):
 * images_per_s — n / (job done − first worker ready). images_per_s_steady: between 10 % and 90 % finished.
 * worker_cpu_ms_per_image — CPU of the worker processes (each from the moment it logged `ready.` to job done,
   so interpreter start and imports are excluded, lazy adapter creation included) / n.
 * added_latency_ms_p50 / _p99 — per image: the task's run time (Celery's task_prerun to task_postrun signals,
   i.e. from the task function's start to its return, after the result upload and the job-counter update;
   recorded by a measurement probe, see PROBE_SOURCE) minus `timings_ms.score` of that image's result document
   (the Predict call as the worker timed it). Task ids are matched to blobs through the prefilled queue's
   messages; up to --latency-sample result documents are read. task_ms_p50/p99, download_ms_p50 and
   score_ms_p50/p99 are the parts; added_latency_ms_p99_after_first_batch leaves out each process's first
   `in-flight` tasks (a freshly started process's first batch).
 * worker_first_task_s — earliest worker launch to the first task start (probe).
 * redis_peak_mb — peak `INFO memory` used_memory (sampled every 100 ms from before the enqueue to job done)
   minus used_memory just before the enqueue (an empty database).
 * worker_rss_mb — the largest VmHWM (peak resident set) of the worker processes.
 * worker_startup_s — process launch to its `ready.` log line (its timestamp), the slowest process.
 * enqueue_cli_s — wall time of the enqueue command for n images (interpreter start included).
 * handwritten_images_per_s / _cpu_ms_per_image / _rss_mb — bench/handwritten_threads.py, P processes × C
   threads, same n images, same stack, run right after; handwritten_azurite_/_standin_cpu_ms_per_image: the rest
   of the stack over that run; handwritten_stderr_lines: lines the loop printed to stderr (a user would see them).
   baseline_images_per_s — bench/baseline_loop.py (one image at a time) on the same corpus at the same latency;
   speedup_vs_baseline = images_per_s / baseline_images_per_s. The two ratios against the threaded loop:
   vs_handwritten = images_per_s / handwritten_images_per_s (> 1: blobscore is faster) and cpu_vs_handwritten
   = worker_cpu_ms_per_image / handwritten_cpu_ms_per_image (> 1: blobscore spends more CPU per image).
 * standin_/azurite_/redis_cpu_ms_per_image — what the rest of the stack spent over the same interval.

The Redis-memory scenario queues a job of --redis-job-images generated names through the real `enqueue` command
against a synthetic List Blobs endpoint (the blobs do not exist) with no worker: the producer fills its window and
waits. redis_peak_mb is then measured with nothing consuming (the worst case); after that an emulated consumer
(pops messages, records each outcome through JobStore.record_outcome) lets the job finish and the peak over the
run is reported too (by default the consumer runs --redis-job-drain-s seconds and the producer is then stopped —
it is resumable; --redis-job-finish runs the whole job). producer_listing_per_s comes from `enqueue --dry-run` over
a 20,000-name synthetic container, producer_enqueue_per_s from the enqueue until the window was full (both minus
the command's start-up time, which is reported); producer_listing_per_s_azurite is the dry run over the uploaded
images in Azurite. The synthetic endpoint answers at once: a real storage account adds ~100+ ms a page of 5000.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import http.server
import inspect
import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient, ContentSettings
from photo_corpus import distribution, photo_corpus
from PIL import Image

from deploy.local.azurite import connection_string, start_azurite
from deploy.local.procs import ManagedProcess, free_port
from deploy.local.redis_local import start_redis
from worker.jobs import JobStore
from worker.settings import Settings

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
KEY = "bench-key-not-a-secret"
SERVICE = "bench"
SOURCE = "bench-src"
TINY_PREFIX = "img/"  # the tiny crops (small_jpegs), under the prefix earlier runs used
PHOTO_PREFIX = "photo/"  # the camera-sized photos (bench/photo_corpus.py)
CORPUS_PREFIX = {"tiny": TINY_PREFIX, "photos": PHOTO_PREFIX}
SYNTH_CONTAINER = "synth"
SYNTH_RESULTS = "synth-results"
SYNTH_LISTING = "synth-listing"  # a smaller synthetic container, for the listing rate
LISTING_SAMPLE = 20_000
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1024 * 1024


# ---------------------------------------------------------------------------------------------------------------
# /proc accounting


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def tree_pids(pid: int) -> list[int]:
    """`pid` and its live descendants."""
    children, found, todo = _children_map(), [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and its descendants: utime+stime+cutime+cstime of each live process in the tree."""
    total = 0
    for member in tree_pids(pid):
        fields = _stat_fields(member)
        if fields is not None:
            total += sum(int(value) for value in fields[11:15])
    return total / CLK_TCK


def status_kb(pid: int, name: str) -> int:
    """A `/proc/<pid>/status` figure in kB (VmRSS, VmHWM), 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def r3(value: float | None) -> float | None:
    """Rounded for printing."""
    return None if value is None else round(value, 3)


class RedisMemorySampler:
    """Samples `INFO memory` used_memory (and optionally a list's length) every `interval` seconds in a thread."""

    def __init__(self, url: str, interval: float = 0.1, list_key: str | None = None) -> None:
        self._client = redis.Redis.from_url(url)
        self._interval = interval
        self._list_key = list_key
        self._stop = threading.Event()
        self.peak = 0
        self.samples: list[tuple[float, int, int]] = []  # (time, used_memory, list length)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def used(self) -> int:
        """used_memory now."""
        return int(self._client.info("memory")["used_memory"])

    def __enter__(self) -> RedisMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._client.close()

    def _sample(self) -> None:
        used = self.used()
        length = int(self._client.llen(self._list_key)) if self._list_key else 0
        self.peak = max(self.peak, used)
        self.samples.append((time.time(), used, length))

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(redis.RedisError):
                self._sample()
            self._stop.wait(self._interval)


# ---------------------------------------------------------------------------------------------------------------
# The private stack


@dataclass
class Stack:
    """Redis, Azurite and one stand-in per latency, all private to this run."""

    workdir: Path
    redis_proc: ManagedProcess
    redis_url: str
    azurite: ManagedProcess
    connection_string: str
    standins: dict[float, tuple[ManagedProcess, int]] = field(default_factory=dict)

    def redis(self) -> redis.Redis:
        """A client on the private Redis."""
        return redis.Redis.from_url(self.redis_url)

    def blob_service(self) -> BlobServiceClient:
        """A Blob client on the private Azurite."""
        return BlobServiceClient.from_connection_string(self.connection_string)

    def stop(self) -> None:
        """Stop everything this run started."""
        for process, _ in self.standins.values():
            process.stop()
        self.azurite.stop()
        self.redis_proc.stop()


def start_standin(workdir: Path, latency_ms: float, workers: int) -> tuple[ManagedProcess, int]:
    """A stand-in in latency-emulation mode on a free port; returns it and its port (the tests' harness)."""
    sys.path.insert(0, str(REPO / "tests"))
    import harness  # the one way the suites and the benchmarks start a stand-in

    return harness.start_standin(
        workdir / "logs", "--no-model", "--emulate-latency-ms", f"{latency_ms:g}", "--workers", str(workers),
        "--service-name", SERVICE, "--log-level", "WARNING", key=KEY, log_name=f"standin-{latency_ms:g}ms.log",
        env=_clean_environ(),
    )


def start_stack(workdir: Path, latencies: list[float], standin_workers: int, access_log: bool = False) -> Stack:
    """Start the private stack (stopping what already started if a later part fails)."""
    started: list[ManagedProcess] = []
    try:
        redis_port = free_port()
        redis_proc = start_redis(redis_port, workdir / "redis")
        started.append(redis_proc)
        azurite_port = free_port()
        azurite = start_azurite(azurite_port, workdir / "logs" / "azurite.log", access_log=access_log)
        started.append(azurite)
        stack = Stack(workdir, redis_proc, f"redis://127.0.0.1:{redis_port}/0", azurite,
                      connection_string(azurite_port))
        for latency in latencies:
            stack.standins[latency] = start_standin(workdir, latency, standin_workers)
            started.append(stack.standins[latency][0])
        return stack
    except BaseException:
        for process in reversed(started):
            process.stop()
        raise


def _clean_environ() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("BLOBSCORE_")}


def blobscore_env(stack: Stack, scoring_port: int, queue: str, **extra: str) -> dict[str, str]:
    """The BLOBSCORE_* environment of this run's workers and commands."""
    return {
        **_clean_environ(),
        "BLOBSCORE_BROKER_URL": stack.redis_url,
        "BLOBSCORE_QUEUE": queue,
        "BLOBSCORE_BLOB_CONNECTION_STRING": stack.connection_string,
        "BLOBSCORE_SCORING_ADDRESS": "127.0.0.1",
        "BLOBSCORE_SCORING_PORT": str(scoring_port),
        "BLOBSCORE_SCORING_KEY": KEY,
        "BLOBSCORE_SCORING_SERVICE_NAME": SERVICE,
        "BLOBSCORE_SERVICE": SERVICE,
        "BLOBSCORE_SCORING_MODEL": "resnet50",
        "BLOBSCORE_SCORING_TIMEOUT_S": "20",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def settings_for(env: dict[str, str]) -> Settings:
    """The Settings a worker or command builds from `env` (they run where there is no config file).

    The deployment's Redis keys and queue names carry a namespace derived from the storage account: the job store
    and the queue's list key must come from the same settings, not be spelled out here.
    """
    values = {key.removeprefix("BLOBSCORE_").lower(): value for key, value in env.items()
              if key.startswith("BLOBSCORE_")}
    return Settings(**values)


def job_store(env: dict[str, str]) -> JobStore:
    """The job records of the deployment `env` configures."""
    return JobStore.from_settings(settings_for(env))


# ---------------------------------------------------------------------------------------------------------------
# Images


def small_jpegs(count: int, seed: int = 7) -> Iterator[bytes]:
    """`count` small real JPEGs (a few KB): random crops of the sample photos that ship in PyPI packages."""
    from producer.samples import sample_photos

    photos = []
    for data in sample_photos().values():
        image = Image.open(io.BytesIO(data)).convert("RGB")
        image.thumbnail((320, 320))
        photos.append(image)
    rng = random.Random(seed)
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = rng.choice([(96, 96), (128, 96), (96, 128), (112, 84)])
        left, top = rng.randint(0, photo.width - width), rng.randint(0, photo.height - height)
        tile = photo.crop((left, top, left + width, top + height))
        if rng.random() < 0.5:
            tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = io.BytesIO()
        tile.save(out, format="JPEG", quality=rng.choice([80, 85, 90]))
        yield out.getvalue()


def _upload_all(stack: Stack, prefix: str, items: Iterable[bytes]) -> tuple[list[int], float]:
    """Upload every item as bench-src/<prefix>NNNNNN.jpg (8 at a time); their sizes and the seconds it took."""
    service = stack.blob_service()
    with contextlib.suppress(ResourceExistsError):  # the other corpus created it
        service.create_container(SOURCE)
    container = service.get_container_client(SOURCE)
    jpeg = ContentSettings(content_type="image/jpeg")
    started = time.perf_counter()
    sizes: list[int] = []

    def put(index: int, data: bytes) -> None:
        container.upload_blob(f"{prefix}{index:06d}.jpg", data, overwrite=True, content_settings=jpeg)

    futures = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for index, data in enumerate(items):
            sizes.append(len(data))
            futures.append(pool.submit(put, index, data))
    for future in futures:
        future.result()  # a failed upload fails the run here rather than as a short corpus later
    service.close()
    return sizes, time.perf_counter() - started


def upload_images(stack: Stack, count: int) -> dict[str, Any]:
    """Upload `count` tiny JPEGs as bench-src/img/NNNNNN.jpg; returns how long it took and their sizes."""
    sizes, seconds = _upload_all(stack, TINY_PREFIX, small_jpegs(count))
    return {"images": count, "upload_s": r3(seconds), "image_bytes_mean": round(statistics.mean(sizes)),
            "image_bytes_max": max(sizes)}


def upload_photos(stack: Stack, count: int, seed: int, cache_dir: Path | None) -> dict[str, Any]:
    """Upload the photo corpus (bench/photo_corpus.py, generated once and cached) as bench-src/photo/NNNNNN.jpg."""
    photos = photo_corpus(count, seed, cache_dir)
    _, seconds = _upload_all(stack, PHOTO_PREFIX, (photo.path.read_bytes() for photo in photos))
    return {"photos_upload_s": r3(seconds), "photos_seed": seed, "photos_directory": str(photos[0].path.parent),
            "photo_corpus": distribution(photos)}


# ---------------------------------------------------------------------------------------------------------------
# Commands and worker logs


@functools.cache
def listing_in_process() -> tuple[str, ...]:
    """The `enqueue` flag that has the command list and queue every image itself before it returns.

    Where the fleet carries a job's listing, `enqueue` returns at once unless given --wait; the scenarios need the
    queue prefilled before any worker starts, and the Redis job measures the command's own listing. A version
    without the flag always lists in process.
    """
    done = subprocess.run([sys.executable, "-m", "producer.cli", "enqueue", "--help"], env=_clean_environ(),
                          capture_output=True, text=True, timeout=120, check=False)
    return ("--wait",) if "--wait" in done.stdout else ()


def run_cli(env: dict[str, str], cwd: Path, *args: str, timeout: float = 600) -> tuple[dict[str, Any], float]:
    """Run `python -m producer.cli ARGS --json`; its JSON and the command's wall time."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "producer.cli", *args, "--json"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"blobscore {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
READY = re.compile(_STAMP + r".*\bready\.\s*$", re.MULTILINE)
RETRYING = re.compile(r"\bretry(ing)?\b", re.IGNORECASE)


def log_time(stamp: str) -> float:
    """A Python logging asctime (local time) as epoch seconds."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def queued_tasks(client: redis.Redis, queue: str) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """The list key of `queue`'s messages and, per Celery task id, the first argument of the task."""
    keys = [key for key in client.scan_iter(match=f"{queue}*", count=1000) if client.type(key) == b"list"]
    tasks: dict[str, dict[str, Any]] = {}
    for key in keys:
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            body = message["body"]
            if message.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]
            first = args[0] if args else {}
            tasks[message["headers"]["id"]] = first if isinstance(first, dict) else {"batch": first}
    return (keys[0].decode() if keys else None), tasks


# Per-task timing probe, loaded into the worker processes through PYTHONPATH (a sitecustomize module): Celery's
# own task_prerun/task_postrun signals, one buffered line per task, written out at exit. The worker's code and
# entry point are untouched; the probe's cost (two signal dispatches and a buffered write, a few µs a task) is
# inside worker_cpu_ms_per_image. Celery's per-task log lines cannot be used: the worker silences them.
PROBE_SOURCE = """
import os
_out = os.environ.get("BLOBSCORE_BENCH_PROBE")
if _out:
    import atexit, time
    from celery.signals import task_postrun, task_prerun, worker_shutdown
    _starts = {}
    _sink = open(f"{_out}.{os.getpid()}", "w", buffering=1 << 16)

    def _pre(task_id=None, **_):
        _starts[task_id] = (time.time(), time.perf_counter())

    def _post(task_id=None, state=None, **_):
        start = _starts.pop(task_id, None)
        if start is not None:
            _sink.write(f"{task_id} {start[0]:.6f} {(time.perf_counter() - start[1]) * 1000:.3f} {state}\\n")

    def _close(**_):
        if not _sink.closed:
            _sink.close()

    task_prerun.connect(_pre, weak=False)
    task_postrun.connect(_post, weak=False)
    worker_shutdown.connect(_close, weak=False)
    atexit.register(_close)
"""


def install_probe(workdir: Path) -> Path:
    """Write the probe's sitecustomize.py; returns the directory to put on the workers' PYTHONPATH."""
    directory = workdir / "probe"
    directory.mkdir(exist_ok=True)
    (directory / "sitecustomize.py").write_text(PROBE_SOURCE)
    return directory


def read_probe(prefix: Path) -> dict[str, tuple[float, float, str]]:
    """Per task id: (start epoch seconds, run time ms, worker pid), from every worker process's probe file."""
    rows: dict[str, tuple[float, float, str]] = {}
    for path in prefix.parent.glob(f"{prefix.name}.*"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                rows[parts[0]] = (float(parts[1]), float(parts[2]), path.suffix.lstrip("."))
    return rows


def first_tasks(probed: dict[str, tuple[float, float, str]], per_process: int) -> set[str]:
    """The ids of each worker process's first `per_process` tasks (its first batch in flight: warm-up)."""
    by_pid: dict[str, list[tuple[float, str]]] = {}
    for task_id, (start, _, pid) in probed.items():
        by_pid.setdefault(pid, []).append((start, task_id))
    return {task_id for rows in by_pid.values() for _, task_id in sorted(rows)[:per_process]}


@dataclass
class WorkerRun:
    """One started `python -m worker` process and what we learn about it."""

    process: ManagedProcess
    launched_at: float
    log: Path
    ready_at: float | None = None
    cpu_at_ready: float = 0.0


def start_workers(env: dict[str, str], count: int, concurrency: int, logs: Path, tag: str) -> list[WorkerRun]:
    """Launch `count` workers at once; return once each logged ready, with its CPU time at that moment."""
    runs = []
    for index in range(count):
        log = logs / f"{tag}-w{index}.log"
        process = ManagedProcess.start([sys.executable, "-m", "worker"], log,
                                       env={**env, "BLOBSCORE_WORKER_CONCURRENCY": str(concurrency)}, cwd=logs)
        runs.append(WorkerRun(process, time.time(), log))
    deadline = time.monotonic() + 90
    while any(run.ready_at is None for run in runs):
        for run in runs:
            if run.ready_at is None:
                match = READY.search(run.log.read_text(errors="replace"))
                if match:
                    run.cpu_at_ready = cpu_s(run.process.pid)
                    run.ready_at = log_time(match.group(1))
                elif not run.process.alive():
                    raise RuntimeError(f"worker exited on start:\n{run.process.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError("a worker did not become ready in 90 s")
        time.sleep(0.01)
    return runs


def wait_until_done(
    env: dict[str, str], job_id: str, timeout: float
) -> tuple[float, list[tuple[float, int]], dict[str, Any]]:
    """Poll JobStore.status every 50 ms until the job is done: (done time, (time, finished) samples, last status)."""
    jobs = job_store(env)
    progress: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            status = jobs.status(job_id)
            now = time.time()
            progress.append((now, status.ok + status.rejected))
            if status.state == "done":
                return now, progress, {"ok": status.ok, "rejected": status.rejected, "state": status.state}
            if time.monotonic() > deadline:
                return now, progress, {"ok": status.ok, "rejected": status.rejected, "state": "timed_out",
                                       "pending": status.pending, "retrying": status.retrying}
            time.sleep(0.05)
    finally:
        jobs.close()


def steady_rate(progress: list[tuple[float, int]], total: int) -> float | None:
    """Images/s between 10 % and 90 % finished."""
    low = next((t for t, done in progress if done >= 0.1 * total), None)
    high = next((t for t, done in progress if done >= 0.9 * total), None)
    if low is None or high is None or high <= low:
        return None
    return 0.8 * total / (high - low)


# ---------------------------------------------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True)
class Scenario:
    """One point of the matrix."""

    latency_ms: float
    processes: int
    inflight: int
    images: int
    corpus: str = "tiny"

    @property
    def name(self) -> str:
        """A short id, also the results prefix."""
        return f"{self.corpus}-lat{self.latency_ms:g}-p{self.processes}-c{self.inflight}"

    @property
    def prefix(self) -> str:
        """Where its corpus is in the source container."""
        return CORPUS_PREFIX[self.corpus]


def read_docs(stack: Stack, container: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """Result documents by result blob name."""
    service = stack.blob_service()
    client = service.get_container_client(container)

    def fetch(name: str) -> tuple[str, dict[str, Any]]:
        return name, json.loads(client.download_blob(name).readall())

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(pool.map(fetch, names))
    finally:
        service.close()


def delete_container(stack: Stack, container: str) -> None:
    """Drop a results container (Azurite slows down as it fills)."""
    service = stack.blob_service()
    with contextlib.suppress(Exception):
        service.delete_container(container)
    service.close()


def run_worker_scenario(stack: Stack, scenario: Scenario, index: int, latency_sample: int) -> dict[str, Any]:
    """Enqueue n images (prefilled queue), start P workers, measure until the job is done."""
    results_container = f"res-{index:02d}"
    prefix = f"{scenario.name}/"
    queue = f"bench-{index:02d}"
    standin, scoring_port = stack.standins[scenario.latency_ms]
    logs = stack.workdir / "logs"
    probe = logs / f"probe-{scenario.name}"
    env = blobscore_env(stack, scoring_port, queue, BLOBSCORE_BENCH_PROBE=str(probe),
                        PYTHONPATH=str(install_probe(stack.workdir)))
    service = stack.blob_service()
    service.create_container(results_container)
    service.close()
    client = stack.redis()
    client.flushdb()
    out: dict[str, Any] = {"scenario": scenario.name, "corpus": scenario.corpus,
                           "scorer_latency_ms": scenario.latency_ms, "worker_processes": scenario.processes,
                           "inflight_per_process": scenario.inflight, "images": scenario.images}
    with RedisMemorySampler(stack.redis_url) as memory:
        idle = memory.used()
        enqueued, enqueue_wall = run_cli(env, logs, "enqueue", *listing_in_process(), "--container", SOURCE,
                                         "--prefix", scenario.prefix, "--results-container", results_container,
                                         "--results-prefix", prefix, "--limit", str(scenario.images))
        job_id, listed = enqueued["job_id"], int(enqueued["listed"])
        _, tasks = queued_tasks(client, queue)
        others = {"standin": standin.pid, "azurite": stack.azurite.pid, "redis": stack.redis_proc.pid}
        workers = start_workers(env, scenario.processes, scenario.inflight, logs, scenario.name)
        others_cpu = {name: cpu_s(pid) for name, pid in others.items()}
        first_ready = min(run.ready_at or 0 for run in workers)
        done_at, progress, final = wait_until_done(env, job_id, timeout=max(180, listed / 3))
        worker_cpu = sum(cpu_s(run.process.pid) - run.cpu_at_ready for run in workers)
        others_cpu = {name: cpu_s(pid) - others_cpu[name] for name, pid in others.items()}
        rss_kb = [status_kb(run.process.pid, "VmHWM") for run in workers]
    for run in workers:
        run.process.stop(timeout=20)
    elapsed = done_at - first_ready
    out.update({
        "images": listed,
        "job_state": final["state"], "ok": final["ok"], "rejected": final["rejected"],
        "images_per_s": r3(listed / elapsed) if elapsed > 0 else None,
        "images_per_s_steady": r3(steady_rate(progress, listed)),
        "elapsed_s": r3(elapsed),
        "worker_cpu_ms_per_image": r3(worker_cpu * 1000 / listed),
        **{f"{name}_cpu_ms_per_image": r3(value * 1000 / listed) for name, value in others_cpu.items()},
        "redis_peak_mb": r3((memory.peak - idle) / MB),
        "worker_rss_mb": r3(max(rss_kb) / 1024),
        "worker_startup_s": r3(max((run.ready_at or 0) - run.launched_at for run in workers)),
        "enqueue_cli_s": r3(enqueue_wall),
    })
    out.update(_latency_figures(stack, workers, read_probe(probe), tasks, results_container, latency_sample,
                                scenario.inflight))
    delete_container(stack, results_container)
    client.flushdb()
    client.close()
    return out


def _latency_figures(
    stack: Stack, workers: list[WorkerRun], probed: dict[str, tuple[float, float, str]],
    tasks: dict[str, dict[str, Any]], results_container: str, sample: int, inflight: int,
) -> dict[str, Any]:
    """Per-image added latency: the probe's task run time minus the result document's score time."""
    retry_lines = 0
    for run in workers:
        text = run.log.read_text(errors="replace")
        retry_lines += sum(1 for line in text.splitlines() if "WARNING" in line and RETRYING.search(line))
    launched = min(run.launched_at for run in workers)
    figures: dict[str, Any] = {
        "worker_first_task_s": r3(min(start for start, _, _ in probed.values()) - launched) if probed else None,
        "worker_retry_log_lines": retry_lines,
        "tasks_probed": len(probed),
    }
    matched = [(task_id, task) for task_id, task in tasks.items() if task_id in probed and "blob" in task]
    if not matched:
        figures["added_latency_note"] = "no probed task matches a queued single-image message"
        return figures
    chosen = random.Random(1).sample(matched, min(sample, len(matched)))
    names = {f"{task['results_prefix']}{task['blob']}.json": task_id for task_id, task in chosen}
    docs = read_docs(stack, results_container, list(names))
    warm_up = first_tasks(probed, inflight)
    added, added_warm, task_ms, download, score = [], [], [], [], []
    for name, doc in docs.items():
        timings = doc.get("timings_ms", {})
        runtime = probed[names[name]][1]
        task_ms.append(runtime)
        download.append(float(timings.get("download", 0.0)))
        score.append(float(timings.get("score", 0.0)))
        added.append(runtime - score[-1])
        if names[name] not in warm_up:
            added_warm.append(added[-1])
    figures.update({
        "added_latency_ms_p50": r3(percentile(added, 50)),
        "added_latency_ms_p99": r3(percentile(added, 99)),
        "added_latency_sampled_images": len(added),
        # Without each process's first batch (its first `in-flight` tasks, which meet a cold process).
        "added_latency_ms_p99_after_first_batch": r3(percentile(added_warm, 99)),
        "task_ms_p50": r3(percentile(task_ms, 50)),
        "task_ms_p99": r3(percentile(task_ms, 99)),
        "download_ms_p50": r3(percentile(download, 50)),
        "score_ms_p50": r3(percentile(score, 50)),
        "score_ms_p99": r3(percentile(score, 99)),
    })
    return figures


def run_loop(stack: Stack, script: str, latency_ms: float, images: int, processes: int, threads: int | None,
             tag: str, prefix: str = TINY_PREFIX) -> dict[str, Any]:
    """Run the plain or the threaded loop (P processes, one shard each) over the first `images` images."""
    standin, port = stack.standins[latency_ms]
    container = f"loop-{tag}"
    service = stack.blob_service()
    service.create_container(container)
    service.close()
    env = blobscore_env(stack, port, "unused")
    argv = [sys.executable, str(BENCH / script), "--container", SOURCE, "--prefix", prefix,
            "--results-container", container, "--results-prefix", f"{tag}/", "--address", f"127.0.0.1:{port}",
            "--service-name", SERVICE, "--limit", str(images), "--shards", str(processes)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    # The rest of the stack over the loop's run (its start-up and listing included, a few ms of Azurite).
    others = {"standin": standin.pid, "azurite": stack.azurite.pid}
    others_before = {name: cpu_s(pid) for name, pid in others.items()}
    launched = [subprocess.Popen([*argv, "--shard", str(shard)], env=env, cwd=stack.workdir,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for shard in range(processes)]
    reports, warnings = [], 0
    for shard, process in enumerate(launched):
        stdout, stderr = process.communicate(timeout=1800)
        if process.returncode != 0:
            raise RuntimeError(f"{script} failed:\n{stderr[-3000:]}")
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
        # The loops print nothing else: any stderr line is what a user would see on the terminal (a warning, a
        # thread's traceback). Kept in the logs.
        warnings += sum(1 for line in stderr.splitlines() if line.strip())
        (stack.workdir / "logs" / f"{tag}-{shard}.stderr").write_text(stderr)
    others_cpu = {name: cpu_s(pid) - others_before[name] for name, pid in others.items()}
    delete_container(stack, container)
    total = sum(report["images"] for report in reports)
    elapsed = max(r["ended_at"] for r in reports) - min(r["started_at"] for r in reports)
    cpu_ms = sum(r["cpu_ms_per_image"] * r["images"] for r in reports) / total
    return {"images": total, "images_per_s": r3(total / elapsed), "elapsed_s": r3(elapsed),
            "cpu_ms_per_image": r3(cpu_ms), "stderr_lines": warnings,
            "rss_mb": max((r.get("rss_mb") or 0.0 for r in reports), default=None),
            **{f"{name}_cpu_ms_per_image": r3(value * 1000 / total) for name, value in others_cpu.items()}}


# ---------------------------------------------------------------------------------------------------------------
# The 200,000-image job: a synthetic listing endpoint, the real enqueue command, Redis memory


def _listing_page(container: str, count: int, prefix: str, marker: str, max_results: int) -> bytes:
    start = int(marker) if marker else 0
    if prefix not in ("", "synthetic/"):
        count = 0  # every other prefix is empty
    end = min(count, start + max_results)
    stamp = "Mon, 01 Jan 2024 00:00:00 GMT"
    # The properties a real storage account returns for a block blob, so the SDK parses what it would parse.
    entries = "".join(
        f"<Blob><Name>synthetic/{i:07d}.jpg</Name><Properties><Creation-Time>{stamp}</Creation-Time>"
        f"<Last-Modified>{stamp}</Last-Modified><Etag>0x8DC{i:013X}</Etag><Content-Length>4096</Content-Length>"
        "<Content-Type>image/jpeg</Content-Type><Content-Encoding /><Content-Language /><Content-CRC64 />"
        "<Content-MD5>1B2M2Y8AsgTpgAmY7PhCfg==</Content-MD5><Cache-Control /><Content-Disposition />"
        "<BlobType>BlockBlob</BlobType><AccessTier>Hot</AccessTier><AccessTierInferred>true</AccessTierInferred>"
        "<LeaseStatus>unlocked</LeaseStatus><LeaseState>available</LeaseState>"
        "<ServerEncrypted>true</ServerEncrypted></Properties><Metadata /></Blob>"
        for i in range(start, end)
    )
    next_marker = str(end) if end < count else ""
    return (
        '<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint="http://127.0.0.1/" '
        f'ContainerName="{container}"><Prefix>{prefix}</Prefix><Marker>{marker}</Marker>'
        f"<MaxResults>{max_results}</MaxResults><Blobs>{entries}</Blobs><NextMarker>{next_marker}</NextMarker>"
        "</EnumerationResults>"
    ).encode()


def serve_synthetic_listing(port: int, count: int) -> None:
    """Answer List Blobs: `count` generated JPEG names in `synth`, up to LISTING_SAMPLE in `synth-listing`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            container = url.path.strip("/").split("/")[-1]
            if query.get("restype") == "container" and "comp" not in query:
                self._container_properties(container)
                return
            if query.get("comp") != "list":
                self._reply(404, b"", {"x-ms-error-code": "BlobNotFound"})
                return
            sizes = {SYNTH_CONTAINER: count, SYNTH_LISTING: min(count, LISTING_SAMPLE)}
            body = _listing_page(container, sizes.get(container, 0), query.get("prefix", ""),
                                 query.get("marker", ""), int(query.get("maxresults", "5000")))
            self._reply(200, body, {"Content-Type": "application/xml"})

        def do_HEAD(self) -> None:
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query, keep_blank_values=True))
            if query.get("restype") == "container":
                self._container_properties(urllib.parse.urlsplit(self.path).path.strip("/").split("/")[-1])
                return
            self._reply(404, b"", {"x-ms-error-code": "BlobNotFound"})

        def _container_properties(self, container: str) -> None:
            # The synthetic containers exist (the enqueue command may look before it lists); any other does not.
            if container not in (SYNTH_CONTAINER, SYNTH_LISTING, SYNTH_RESULTS):
                self._reply(404, b"", {"x-ms-error-code": "ContainerNotFound"})
                return
            self._reply(200, b"", {"ETag": '"0x8DC000000000000"', "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT",
                                   "x-ms-lease-status": "unlocked", "x-ms-lease-state": "available",
                                   "x-ms-has-immutability-policy": "false", "x-ms-has-legal-hold": "false"})

        def _reply(self, code: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(code)
            for name, value in {**headers, "x-ms-version": "2025-01-05", "x-ms-request-id": "bench",
                                "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


def run_producer_on_azurite(stack: Stack, prefix: str = TINY_PREFIX) -> dict[str, Any]:
    """The enqueue command's listing rate over the uploaded images in Azurite (dry run, start-up subtracted)."""
    env = blobscore_env(stack, 1, "bench-dry")
    service = stack.blob_service()
    service.create_container("res-dry")
    service.close()
    logs = stack.workdir / "logs"
    common = ["enqueue", "--container", SOURCE, "--results-container", "res-dry", "--dry-run"]
    _, startup = run_cli(env, logs, *common, "--prefix", "nothing/")
    dry, wall = run_cli(env, logs, *common, "--prefix", prefix)
    listing_s = wall - startup
    # A few hundred names list faster than the start-up time wobbles: no rate rather than a meaningless one.
    rate = r3(int(dry["listed"]) / listing_s) if listing_s > 0.1 else None
    return {"scenario": "producer_azurite", "producer_cli_startup_s": r3(startup), "images": int(dry["listed"]),
            "producer_listing_per_s_azurite": rate}


def _window_setting() -> int | None:
    from worker.settings import Settings

    info = Settings.model_fields.get("enqueue_window")
    return None if info is None else int(info.default)


class Drainer:
    """An emulated consumer: pops the job's messages and records each outcome through JobStore.record_outcome."""

    def __init__(self, env: dict[str, str], list_key: str) -> None:
        self._client = redis.Redis.from_url(env["BLOBSCORE_BROKER_URL"])
        self._jobs = job_store(env)
        self._key = list_key
        self._params = list(inspect.signature(JobStore.record_outcome).parameters)[1:]
        self._stop = threading.Event()
        self.drained = 0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Drain in a thread until stopped."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after emptying the queue."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while True:
                raw = self._client.rpop(self._key, 500)
                if not raw:
                    if self._stop.is_set():
                        return
                    time.sleep(0.05)
                    continue
                for message in raw:
                    envelope = json.loads(message)
                    task = json.loads(base64.b64decode(envelope["body"]))[0][0]
                    values = {"job_id": task["job_id"], "index": task.get("index"), "blob": task["blob"],
                              "outcome": "ok"}
                    self._jobs.record_outcome(*[values[name] for name in self._params])
                self.drained += len(raw)
        except Exception as exc:  # reported, not raised: the figures before it still stand
            self.error = f"{type(exc).__name__}: {exc}"


def run_redis_job(stack: Stack, count: int, finish: bool, drain_s: float) -> dict[str, Any]:
    """Queue a `count`-image job with no worker; Redis peak with nothing consuming, then with an instant consumer."""
    port = free_port()
    logs = stack.workdir / "logs"
    server = ManagedProcess.start([sys.executable, str(Path(__file__).resolve()), "--serve-synthetic-listing",
                                   "--listing-port", str(port), "--listing-count", str(count)],
                                  logs / "synthetic-listing.log", cwd=stack.workdir)
    out: dict[str, Any] = {"scenario": "redis_job", "images": count, "window_setting": _window_setting()}
    try:
        server.wait_for_log("listening on", 60)
        queue = "bench-redisjob"
        env = blobscore_env(stack, 1, queue, BLOBSCORE_BLOB_CONNECTION_STRING=connection_string(port))
        common = ["enqueue", *listing_in_process(), "--container", SYNTH_CONTAINER, "--results-container",
                  SYNTH_RESULTS]
        _, startup = run_cli(env, logs, *common, "--prefix", "nothing/", "--dry-run")
        dry, listing_wall = run_cli(env, logs, "enqueue", "--container", SYNTH_LISTING, "--results-container",
                                    SYNTH_RESULTS, "--dry-run")
        out.update({
            "producer_cli_startup_s": r3(startup),
            "producer_listing_per_s": r3(int(dry["listed"]) / max(listing_wall - startup, 1e-9)),
            "producer_listing_images": int(dry["listed"]),
        })
        out.update(_enqueue_with_memory(stack, env, logs, common, count, startup, finish, drain_s))
    finally:
        server.stop()
        client = stack.redis()
        client.flushdb()
        client.close()
    return out


def _enqueue_with_memory(stack: Stack, env: dict[str, str], logs: Path, common: list[str], count: int,
                         startup: float, finish: bool, drain_s: float) -> dict[str, Any]:
    client = stack.redis()
    client.flushdb()
    # A service's queue is `<queue>.<namespace>.<service>` (kombu's list key too); the sampler reads its length.
    list_key = settings_for(env).queue_for(SERVICE)
    out: dict[str, Any] = {}
    stdout_path = logs / "redis-job-enqueue.out"
    with RedisMemorySampler(stack.redis_url, list_key=list_key) as memory:
        idle = memory.used()
        launched = time.time()
        with stdout_path.open("w") as stdout:
            producer = subprocess.Popen([sys.executable, "-m", "producer.cli", *common, "--json"], env=env,
                                        cwd=logs, stdout=stdout, stderr=subprocess.STDOUT)
        plateau = _wait_for_plateau(producer, memory, _window_setting())
        queued = int(client.llen(list_key))
        out.update({
            "redis_idle_mb": r3(idle / MB),
            "redis_peak_mb_no_consumer": r3((memory.peak - idle) / MB),
            "queued_with_no_consumer": queued,
            "producer_blocked_at_window": producer.poll() is None,
            "producer_enqueue_per_s": r3(queued / max(plateau - launched - startup, 1e-9)),
        })
        drainer = Drainer(env, list_key)
        drainer.start()
        try:
            producer.wait(timeout=max(600, count / 200) if finish else drain_s)
        except subprocess.TimeoutExpired:
            # Not finishing is the default (a 200,000-image job lists for minutes): the producer is resumable.
            producer.terminate()
            producer.wait(timeout=30)
            if finish:
                out["producer_error"] = "did not finish with an instant consumer"
        drainer.stop()
        finished = time.time()
    out.update({
        "redis_peak_mb": r3((memory.peak - idle) / MB),
        "job_finished": producer.returncode == 0,
        "published_before_stop": drainer.drained,
        "with_consumer_s": r3(finished - plateau),
        "producer_enqueue_per_s_with_consumer": r3((drainer.drained - queued) / max(finished - plateau, 1e-9)),
    })
    if drainer.error:
        out["drainer_error"] = drainer.error
    last = stdout_path.read_text().strip().splitlines()
    with contextlib.suppress(ValueError, IndexError):
        out["enqueue_reported_listed"] = json.loads(last[-1])["listed"]
    client.close()
    return out


def _wait_for_plateau(producer: subprocess.Popen[bytes], memory: RedisMemorySampler, window: int | None) -> float:
    """When the queue stopped growing (the producer waits on its window) or the producer exited.

    The queue grows a listing page at a time, so "stopped" means: it holds the window, or it has not grown for
    three times the longest gap between two pages so far (at least 5 s).
    """
    last_change, last_length, longest_gap = time.time(), 0, 0.0
    while producer.poll() is None:
        length = memory.samples[-1][2] if memory.samples else 0
        now = time.time()
        if length != last_length:
            if last_length:
                longest_gap = max(longest_gap, now - last_change)
            last_change, last_length = now, length
        elif length and ((window and length >= window) or now - last_change >= max(5.0, 3 * longest_gap)):
            return last_change
        time.sleep(0.1)
    return last_change if last_length else time.time()


# ---------------------------------------------------------------------------------------------------------------
# The run


def corpora(args: argparse.Namespace) -> list[str]:
    """The corpora to run, the photos (the main scenario) first."""
    return ["photos", "tiny"] if args.corpus == "both" else [args.corpus]


def matrix(args: argparse.Namespace) -> list[Scenario]:
    """The scenarios: every corpus × latency × processes × in-flight.

    A photo scenario scores the whole photo corpus (the same images in every scenario, so they compare); a tiny one
    scores an image count that grows with the in-flight total and keeps each run short.
    """
    scenarios = []
    for corpus in corpora(args):
        for latency in args.latencies:
            for processes in args.processes:
                for inflight in args.inflight:
                    images = args.photos if corpus == "photos" else min(
                        args.images, max(args.min_images, args.images_per_slot * processes * inflight))
                    scenarios.append(Scenario(latency, processes, inflight, images, corpus))
    return scenarios


def baseline_key(corpus: str, latency: float) -> str:
    """How a plain-loop run is named and looked up."""
    return f"{corpus}-lat{latency:g}"


def run_baselines(stack: Stack, args: argparse.Namespace, scenarios: list[Scenario],
                  collected: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The plain loop once per corpus and latency (one image at a time: a few hundred images are plenty)."""
    baselines: dict[str, dict[str, Any]] = {}
    for corpus, latency in sorted({(s.corpus, s.latency_ms) for s in scenarios}):
        key = baseline_key(corpus, latency)
        count = min(args.baseline_images, args.photos) if corpus == "photos" else args.baseline_images
        baselines[key] = run_loop(stack, "baseline_loop.py", latency, count, 1, None, f"baseline-{key}",
                                  CORPUS_PREFIX[corpus])
        emit({"scenario": f"baseline-{key}", "corpus": corpus, "scorer_latency_ms": latency,
              **{f"baseline_{k}": v for k, v in baselines[key].items()}}, collected)
    return baselines


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, rounded; None when either is missing or the denominator is 0."""
    return r3(numerator / denominator) if numerator and denominator else None


def compare_with_loops(stack: Stack, scenario: Scenario, figures: dict[str, Any], index: int,
                       baselines: dict[str, dict[str, Any]]) -> None:
    """Run the threaded loop on the scenario's images (P processes × C threads) and add both loops' figures."""
    hand = run_loop(stack, "handwritten_threads.py", scenario.latency_ms, figures["images"], scenario.processes,
                    scenario.inflight, f"hw-{index:02d}", scenario.prefix)
    base = baselines[baseline_key(scenario.corpus, scenario.latency_ms)]["images_per_s"]
    figures.update({
        "handwritten_images_per_s": hand["images_per_s"],
        "handwritten_cpu_ms_per_image": hand["cpu_ms_per_image"],
        "handwritten_azurite_cpu_ms_per_image": hand["azurite_cpu_ms_per_image"],
        "handwritten_standin_cpu_ms_per_image": hand["standin_cpu_ms_per_image"],
        "handwritten_stderr_lines": hand["stderr_lines"],
        "handwritten_rss_mb": hand["rss_mb"],
        "baseline_images_per_s": base,
        "speedup_vs_baseline": ratio(figures["images_per_s"], base),
        # worker ÷ threaded loop: images/s (> 1: blobscore is faster) and CPU per image (> 1: it spends more).
        "vs_handwritten": ratio(figures["images_per_s"], hand["images_per_s"]),
        "cpu_vs_handwritten": ratio(figures["worker_cpu_ms_per_image"], hand["cpu_ms_per_image"]),
    })


COMPARED = ("images", "images_per_s", "handwritten_images_per_s", "vs_handwritten", "worker_cpu_ms_per_image",
            "handwritten_cpu_ms_per_image", "cpu_vs_handwritten", "speedup_vs_baseline")


def summarize(scenarios: list[dict[str, Any]], baselines: dict[str, dict[str, Any]],
              redis_job: dict[str, Any] | None, setup: dict[str, Any]) -> dict[str, Any]:
    """Worker vs threaded loop for every scenario, the best per corpus and latency, and the targets of issue 6."""
    ran = [s for s in scenarios if s.get("images_per_s")]
    summary: dict[str, Any] = {
        "summary": True,
        "setup": setup,
        "baselines": baselines,
        "comparison": {s["scenario"]: {key: s.get(key) for key in COMPARED} for s in ran},
    }
    for corpus in sorted({s["corpus"] for s in ran}, key=lambda name: name != "photos"):
        for latency in sorted({s["scorer_latency_ms"] for s in ran if s["corpus"] == corpus}):
            candidates = [s for s in ran if s["corpus"] == corpus and s["scorer_latency_ms"] == latency]
            top = max(candidates, key=lambda s: s["images_per_s"])
            summary[f"best_{corpus}_at_{latency:g}ms"] = {key: top.get(key) for key in (
                "scenario", *COMPARED, "added_latency_ms_p50", "added_latency_ms_p99", "worker_rss_mb")}
    targets = issue6_targets(ran, redis_job)
    summary["targets"] = targets
    summary["targets_missed"] = [t["target"] + f" ({t['scenario']})" for t in targets if t["met"] is False]
    if redis_job:
        summary["redis_job"] = redis_job
    return summary


def issue6_targets(ran: list[dict[str, Any]], redis_job: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each target of issue 6, met or not (per corpus where a scenario figure is compared)."""
    targets: list[dict[str, Any]] = []

    def target(name: str, value: Any, limit: str, met: bool | None, where: str) -> None:
        targets.append({"target": name, "value": value, "limit": limit, "met": met, "scenario": where})

    for corpus in sorted({s["corpus"] for s in ran}, key=lambda name: name != "photos"):
        mine = [s for s in ran if s["corpus"] == corpus]
        cpu = min(mine, key=lambda s: s["worker_cpu_ms_per_image"])
        target("worker_cpu_ms_per_image", cpu["worker_cpu_ms_per_image"], "<= 3", cpu["worker_cpu_ms_per_image"] <= 3,
               f"lowest, {cpu['scenario']}")
        for s in mine:
            if s.get("handwritten_images_per_s"):
                target("images_per_s >= handwritten_images_per_s", s["images_per_s"],
                       f">= {s['handwritten_images_per_s']}", s["images_per_s"] >= s["handwritten_images_per_s"],
                       s["scenario"])
        at60 = [s for s in mine if s["scorer_latency_ms"] == 60 and s.get("speedup_vs_baseline") is not None]
        if at60:
            top60 = max(at60, key=lambda s: s["images_per_s"])
            target("speedup_vs_baseline at 60 ms", top60["speedup_vs_baseline"], ">= 10",
                   top60["speedup_vs_baseline"] >= 10, top60["scenario"])
        rss = max(mine, key=lambda s: s["worker_rss_mb"])
        target("worker_rss_mb", rss["worker_rss_mb"], "<= 150", rss["worker_rss_mb"] <= 150,
               f"largest, {rss['scenario']}")
    first = [s["worker_first_task_s"] for s in ran if s.get("worker_first_task_s") is not None]
    if first:
        target("worker_first_task_s (start-up to first task)", max(first), "<= 2", max(first) <= 2,
               "slowest over all scenarios")
    if redis_job:
        peak = redis_job.get("redis_peak_mb")
        if peak is not None:
            target(f"redis_peak_mb for a {redis_job['images']}-image job", peak, "<= 64", peak <= 64, "redis_job")
        rate = redis_job.get("producer_enqueue_per_s")
        if rate is not None:
            target("producer_enqueue_per_s (listed and enqueued)", rate, ">= 4000", rate >= 4000, "redis_job")
    return targets


def parse_args() -> argparse.Namespace:
    """Flags; --quick picks a small matrix."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="Small matrix: latencies 0 and 60, 1 process, "
                        "32 in flight, 120 photos and 600 tiny images, a 100,000-image Redis job.")
    parser.add_argument("--corpus", choices=("photos", "tiny", "both"), default="both",
                        help="photos: camera-sized JPEGs (bench/photo_corpus.py), the main scenario; tiny: ~3.5 KB "
                             "crops (per-call costs only, comparable with earlier runs); both (default).")
    parser.add_argument("--latencies", type=float, nargs="+", default=None, help="Scorer latencies in ms.")
    parser.add_argument("--processes", type=int, nargs="+", default=None, help="Worker process counts.")
    parser.add_argument("--inflight", type=int, nargs="+", default=None, help="Images in flight per process.")
    parser.add_argument("--photos", type=int, default=None, help="Photos in the corpus; every photo scenario "
                        "scores all of them.")
    parser.add_argument("--photo-seed", type=int, default=11)
    parser.add_argument("--photo-cache", type=Path, default=None,
                        help="Where generated photos are kept (default ~/.cache/blobscore/bench-photos).")
    parser.add_argument("--images", type=int, default=None,
                        help="Tiny JPEGs uploaded (a tiny scenario uses at most these).")
    parser.add_argument("--images-per-slot", type=int, default=20,
                        help="A tiny scenario scores min(images, max(min-images, this × processes × in-flight)).")
    parser.add_argument("--min-images", type=int, default=200)
    parser.add_argument("--baseline-images", type=int, default=None,
                        help="Images for the plain loop (at most the photo corpus for photos).")
    parser.add_argument("--latency-sample", type=int, default=400, help="Result documents read per scenario.")
    parser.add_argument("--redis-job-images", type=int, default=None, help="Size of the Redis-memory job.")
    parser.add_argument("--skip-redis-job", action="store_true")
    parser.add_argument("--redis-job-finish", action="store_true",
                        help="Run the Redis-memory job to its end with the emulated consumer (minutes for 200,000).")
    parser.add_argument("--redis-job-drain-s", type=float, default=20.0,
                        help="Without --redis-job-finish: how long the emulated consumer runs before the producer "
                             "is stopped.")
    parser.add_argument("--skip-scenarios", action="store_true", help="Only the producer and Redis-memory runs.")
    parser.add_argument("--skip-loops", action="store_true", help="No plain or hand-written loop runs.")
    parser.add_argument("--workdir", type=Path, default=None, help="Default: a temporary directory, removed.")
    parser.add_argument("--out", type=Path, default=None, help="Also write all objects to this JSON file.")
    parser.add_argument("--serve-synthetic-listing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--listing-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--listing-count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    args.latencies = args.latencies or [0.0, 60.0]
    args.processes = args.processes or ([1] if quick else [1, 2])
    args.inflight = args.inflight or ([32] if quick else [8, 32])
    args.photos = args.photos or (120 if quick else 240)
    args.images = args.images or (600 if quick else 2000)
    args.baseline_images = args.baseline_images or (100 if quick else 200)
    args.redis_job_images = args.redis_job_images or (100_000 if quick else 200_000)
    return args


def emit(obj: dict[str, Any], collected: list[dict[str, Any]]) -> None:
    """Print one JSON object (one line) and keep it for --out."""
    collected.append(obj)
    print(json.dumps(obj), flush=True)


def upload_corpora(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """Upload each corpus the run needs, once (every scenario reads the same blobs)."""
    wanted = corpora(args)
    setup: dict[str, Any] = {}
    if "photos" in wanted and not args.skip_scenarios:
        setup.update(upload_photos(stack, args.photos, args.photo_seed, args.photo_cache))
    if "tiny" in wanted or args.skip_scenarios:  # the producer's listing rate is measured over the tiny names
        setup.update(upload_images(stack, args.images))
    return setup


def run_scenarios(stack: Stack, args: argparse.Namespace, scenarios: list[Scenario],
                  collected: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every worker scenario, each followed by the threaded loop on the same images; the plain loop first."""
    baselines = run_baselines(stack, args, scenarios, collected) if not args.skip_loops else {}
    results = []
    for index, scenario in enumerate(scenarios):
        try:
            figures = run_worker_scenario(stack, scenario, index, args.latency_sample)
        except Exception as exc:
            emit({"scenario": scenario.name, "error": f"{type(exc).__name__}: {exc}"[:2000]}, collected)
            continue
        if not args.skip_loops:
            compare_with_loops(stack, scenario, figures, index, baselines)
        results.append(figures)
        emit(figures, collected)
    return results, baselines


def main() -> None:
    """Run the benchmark."""
    args = parse_args()
    if args.serve_synthetic_listing:
        serve_synthetic_listing(args.listing_port, args.listing_count)
        return
    scenarios = [] if args.skip_scenarios else matrix(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="blobscore-bench-"))
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    standin_workers = max(64, max(args.processes) * max(args.inflight) + 32)
    started = time.time()
    collected: list[dict[str, Any]] = []
    stack = start_stack(workdir, sorted(set(args.latencies)), standin_workers)
    try:
        setup = {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(), "python": sys.version.split()[0],
                 "standin_workers": standin_workers, "workdir": str(workdir), "corpus": args.corpus,
                 **upload_corpora(stack, args)}
        emit(run_producer_on_azurite(stack, TINY_PREFIX if "images" in setup else PHOTO_PREFIX), collected)
        results, baselines = run_scenarios(stack, args, scenarios, collected)
        redis_job = None
        if not args.skip_redis_job:
            try:
                redis_job = run_redis_job(stack, args.redis_job_images, args.redis_job_finish, args.redis_job_drain_s)
            except Exception as exc:
                redis_job = {"scenario": "redis_job", "error": f"{type(exc).__name__}: {exc}"[:2000]}
            emit(redis_job, collected)
        setup["total_s"] = r3(time.time() - started)
        setup["loadavg_at_end"] = os.getloadavg()
        emit(summarize(results, baselines, redis_job, setup), collected)
    finally:
        stack.stop()
        if args.out:
            args.out.write_text(json.dumps(collected, indent=1) + "\n")
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
