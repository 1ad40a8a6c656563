"""What watching the fleet costs: the metric calls a worker makes per image, and one exporter scrape of a big job.

1. Per image (target: at most 0.1 ms of CPU): the calls the task edge makes for every image — the in-flight gauge
   up and down, the outcome counter, the four stage histograms, the task histogram (worker/tasks.py `score_image`
   and `_report`, worker/metrics.py), the pipeline's two extra `perf_counter` pairs (check, upload) and the Blob
   adapter's error-counting wrapper around its two calls — timed in a loop, on one thread and on 16 at once (the
   worker's thread pool shares the metric locks). The per-image log line is timed apart (text and JSON, written to
   /dev/null): it is a log, not a metric, but it is paid per image too.
2. One scrape of `blobscore exporter` (producer/exporter.py) against a private redis-server holding a 200,000-image
   job (40 listing pages of 5,000 names, half scored), 100 finished jobs, 40,000 queued tasks, worker presence and
   3 schedules: wall and CPU time of a scrape, round trips and commands sent (counted at the socket), and what
   Redis itself spent (INFO commandstats).

    .venv/bin/python bench/metrics_cost.py                 # ~30 s on 2 cores; prints one JSON object
    .venv/bin/python bench/metrics_cost.py --images 200000 --loops 200000 --scrapes 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.local.procs import free_port  # noqa: E402
from deploy.local.redis_local import start_redis  # noqa: E402
from producer.exporter import FleetCollector  # noqa: E402
from producer.scheduling.spec import ScheduleSpec  # noqa: E402
from producer.scheduling.store import RunRecord, ScheduleStore  # noqa: E402
from worker import logs, metrics  # noqa: E402
from worker.deployment import AccountRef, Deployment  # noqa: E402
from worker.jobs import JobSpec, JobStore  # noqa: E402
from worker.presence import Presence  # noqa: E402
from worker.settings import Settings  # noqa: E402

SERVICE = "bench-svc"
TIMINGS_MS = {"download": 4.2, "check": 0.08, "score": 6.1, "upload": 7.9}


@metrics.counts_blob_errors
@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Stands in for worker/storage.py's `_translated` with the one-line decorator on it."""
    yield


def per_image_metrics() -> None:
    """Everything the task edge and the pipeline do for metrics per image (the no-error path)."""
    started = time.perf_counter()
    in_flight = metrics.in_flight(SERVICE)
    in_flight.inc()
    with _translated("download"):
        pass
    check_started = time.perf_counter()
    check_ms = (time.perf_counter() - check_started) * 1000.0
    with _translated("upload"):
        upload_started = time.perf_counter()
    upload_ms = (time.perf_counter() - upload_started) * 1000.0
    metrics.observe_image(SERVICE, "ok", None, True, {**TIMINGS_MS, "check": check_ms, "upload": upload_ms})
    in_flight.dec()
    metrics.task_histogram(SERVICE).observe(time.perf_counter() - started)


def _log_line(logger: logging.Logger) -> Callable[[], None]:
    fields = logs.event(event="image", job_id="20260101T000000-abcdef12", index=123456, container="photos",
                        blob="2026/01/07/IMG_20260107_101112.jpg", service=SERVICE, outcome="ok", status="ok",
                        download_ms=4.2, check_ms=0.08, score_ms=6.1, upload_ms=7.9, task_ms=19.3)

    def line() -> None:
        logger.info("image %s%s", "ok", "", extra=fields)

    return line


def cpu_per_call(call: Callable[[], None], loops: int, threads: int = 1) -> dict[str, float]:
    """CPU microseconds per call (process CPU time over all calls), and wall microseconds per call."""
    per_thread = loops // threads

    def run() -> None:
        for _ in range(per_thread):
            call()

    for _ in range(1000):
        call()  # warm: children created, caches filled
    cpu, wall = time.process_time(), time.perf_counter()
    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    calls = per_thread * threads
    return {"cpu_us": round((time.process_time() - cpu) / calls * 1e6, 2),
            "wall_us": round((time.perf_counter() - wall) / calls * 1e6, 2), "calls": calls, "threads": threads}


def measure_per_image(loops: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        "metrics_1_thread": cpu_per_call(per_image_metrics, loops),
        "metrics_16_threads": cpu_per_call(per_image_metrics, loops, threads=16),
    }
    with open(os.devnull, "w", encoding="utf-8") as sink:
        for log_format in ("text", "json"):
            handler = logging.StreamHandler(sink)
            handler.setFormatter(logs.formatter(log_format))  # type: ignore[arg-type]
            logger = logging.getLogger(f"bench.{log_format}")
            logger.handlers, logger.propagate = [handler], False
            logger.setLevel(logging.INFO)
            results[f"log_line_{log_format}"] = cpu_per_call(_log_line(logger), max(loops // 4, 1000))
    return results


class CountingConnection(redis.Connection):
    """Counts round trips: what reaches the socket (a pipeline is one)."""

    round_trips = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.round_trips += 1
        super().send_packed_command(command, check_health)


def _build_fleet(
    settings: Settings, client: redis.Redis, images: int, history: int, history_pages: int, queued: int
) -> dict[str, Any]:
    jobs = JobStore(client, settings.key_prefix)
    origin = Deployment(settings.namespace_in_use, AccountRef("benchaccount", "benchaccount.blob.core.windows.net"))
    spec = JobSpec("photos", "", SERVICE, "photos", f"blobscore-results/{SERVICE}/")
    page_size = 5000
    big = jobs.create(spec, origin, job_id="20260101T000000-big00000")
    for page in range(images // page_size):
        names = [f"2026/01/{page:03d}/IMG_{page:03d}{index:05d}.jpg" for index in range(page_size)]
        jobs.record_page(big, page, page * page_size, names)
    jobs.advance(big, "token", min(images, images // 2 + settings.enqueue_window), images // page_size)
    jobs.finish_listing(big)
    pipe = client.pipeline(transaction=False)
    for index in range(0, images // 2):
        pipe.setbit(f"{settings.key_prefix}job:{big}:ok", index, 1)
    pipe.execute()
    client.hset(f"{settings.key_prefix}job:{big}", mapping={"ok": images // 2 - 1000, "rejected": 1000})
    for index in range(20):
        jobs.record_retry(big, f"retrying-{index}.jpg")
    for number in range(history):
        done = jobs.create(spec, origin, job_id=f"20251201T{number:06d}-done{number:04d}")
        jobs.record_page(done, 0, 0, [f"old/{number}/img-{index}.jpg" for index in range(1000)])
        jobs.finish_listing(done)
        client.hset(f"{settings.key_prefix}job:{done}", mapping={"ok": 990, "rejected": 10})
        client.set(f"{settings.key_prefix}job:{done}:ok", b"\xff" * 125)
        # As many listing-page keys as a big job leaves (a 200,000-image job: 40), small here: SCAN walks them.
        client.mset({f"{settings.key_prefix}job:{done}:page:{page}:{page * 5000}": "x"
                     for page in range(1, history_pages)})
    queue = settings.queue_for(SERVICE)
    message = "x" * 1200  # about a task message's size
    for start in range(0, queued, 5000):
        client.rpush(queue, *[message] * min(5000, queued - start))
    Presence(settings.key_prefix, [queue]).beat(client)
    schedules = ScheduleStore.from_settings(settings)
    for number in range(3):
        name = f"schedule-{number}"
        schedules.add(ScheduleSpec(name=name, container="photos", service=SERVICE, every="1h"))
        schedules.record_run(name, RunRecord(big, time.time() - 600, time.time() - 540, 10, 0, 0, "beat"))
    return {"big": big, "keys": int(client.dbsize()), "used_memory_mb": round(
        int(client.info("memory")["used_memory"]) / 1e6, 1), "schedules": schedules}


def _commandstats(client: redis.Redis) -> tuple[int, int]:
    stats = client.info("commandstats")
    calls = sum(int(value["calls"]) for name, value in stats.items() if name != "cmdstat_info")
    usec = sum(int(value["usec"]) for name, value in stats.items() if name != "cmdstat_info")
    return calls, usec


def _timed(collector: FleetCollector, plain: redis.Redis, scrapes: int) -> dict[str, Any]:
    walls, cpus = [], []
    CountingConnection.round_trips = 0
    calls_before, usec_before = _commandstats(plain)
    for _ in range(scrapes):
        cpu, wall = time.process_time(), time.perf_counter()
        families = list(collector.collect())
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    calls_after, usec_after = _commandstats(plain)
    return {
        "wall_ms_median": round(statistics.median(walls) * 1000, 2),
        "wall_ms_max": round(max(walls) * 1000, 2),
        "cpu_ms_median": round(statistics.median(cpus) * 1000, 2),
        "exporter_round_trips": CountingConnection.round_trips / scrapes,
        "redis_commands": round((calls_after - calls_before) / scrapes, 1),
        "redis_server_us": round((usec_after - usec_before) / scrapes, 1),
        "samples": sum(len(family.samples) for family in families),
        "redis_up": next(sample.value for family in families for sample in family.samples
                         if sample.name == "blobscore_exporter_redis_up"),
    }


def measure_scrape(images: int, history: int, history_pages: int, queued: int, scrapes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="blobscore-metrics-bench-") as workdir:
        port = free_port()
        server = start_redis(port, Path(workdir))
        url = f"redis://127.0.0.1:{port}/0"
        try:
            settings = Settings(broker_url=url, namespace="bench", service=SERVICE)
            plain = redis.Redis.from_url(url, decode_responses=True)
            fleet = _build_fleet(settings, plain, images, history, history_pages, queued)
            counted = redis.Redis.from_url(url, decode_responses=True, connection_class=CountingConnection)
            collector = FleetCollector(settings, counted, counted, fleet["schedules"])
            first_started = time.perf_counter()
            list(collector.collect())  # the first scrape also reads every finished job once (then remembered)
            first_ms = round((time.perf_counter() - first_started) * 1000, 2)
            with_schedules = _timed(collector, plain, scrapes)
            bare = FleetCollector(settings, counted, counted)
            list(bare.collect())
            without = _timed(bare, plain, scrapes)
            fleet["schedules"].close()
            counted.close()
            plain.close()
            return {
                "job_images": images, "done_jobs": history, "done_job_keys": history_pages + 1,
                "queued_tasks": queued, "schedules": 3, "redis_keys": fleet["keys"],
                "redis_used_memory_mb": fleet["used_memory_mb"], "first_scrape_ms": first_ms,
                "scrape": with_schedules, "scrape_without_schedules": without,
            }
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loops", type=int, default=200_000, help="per-image metric calls timed")
    parser.add_argument("--images", type=int, default=200_000, help="images of the big job")
    parser.add_argument("--history", type=int, default=100, help="finished jobs kept in Redis")
    parser.add_argument("--history-pages", type=int, default=40, help="listing-page keys of each finished job")
    parser.add_argument("--queued", type=int, default=40_000, help="tasks waiting in the service queue")
    parser.add_argument("--scrapes", type=int, default=20, help="scrapes timed")
    args = parser.parse_args()
    print(json.dumps({"per_image": measure_per_image(args.loops),
                      "scrape": measure_scrape(args.images, args.history, args.history_pages, args.queued,
                                               args.scrapes)}, indent=2))


if __name__ == "__main__":
    main()
