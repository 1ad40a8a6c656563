"""What Celery task events cost a worker (for `blobscore flower`, issue 13 item 5); prints one JSON object.

    .venv/bin/python bench/flower_events_cost.py                  # ~4 min on 2 cores
    .venv/bin/python bench/flower_events_cost.py --images 600 --rounds 4 --loops 20000

1. End to end, on bench/pipeline.py's private stack (a Redis on a free port, an in-memory Azurite, a 0 ms stand-in
   `--no-model`), --images tiny JPEGs (~3.5 KB) through one `python -m worker` (--inflight threads), prefilled by
   `blobscore enqueue --wait`, per variant, --rounds rounds in alternating order:
   * shipped — the worker as configured today: remote control off, task events off;
   * remote_control — BLOBSCORE_WORKER_REMOTE_CONTROL=true, `python -m producer.flower_cli` running (it broadcasts
     Celery's `enable_events` every 5 s, as Flower does by default);
   * events — remote control on and Celery's `worker_send_task_events` on, nothing listening to the events;
   * events_flower — the same with Flower running and receiving every event.
   blobscore has no setting for task events yet: every worker runs through LAUNCHER, which, with
   BENCH_TASK_EVENTS=1, adds `worker_send_task_events: True` to worker/celery_app.py's `celery_config` — the
   change the setting would make.
   Per run: worker_cpu_ms_per_image — the worker's /proc CPU from just before the enqueue to the job done, / n;
   worker_busy_cpu_ms_per_image — the same minus the worker's idle CPU rate (measured over --settle-s seconds
   before the enqueue) times that interval; redis_ and flower_cpu_ms_per_image; flower_tasks — tasks Flower knows
   (GET /api/tasks); enabled_by_remote — whether the worker logged Celery's "Events of group {task} enabled by
   remote" (Flower's broadcast took effect); enable_events_reply (remote_control) — the workers' answer to one
   `enable_events` sent with replies after the run.
2. In a loop (--loops tasks): the three events a worker sends per task (task-received with the fields Celery
   gives it, task-started, task-succeeded) through Celery's EventDispatcher on the private Redis, buffered as a
   worker buffers the `task` group and flushed after every event (one PUBLISH each: a worker that is not busy)
   or after every 8 tasks (24 events: Celery's buffer_limit, a busy worker's `task.multi` batches); CPU and wall
   µs per task, one thread.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from pipeline import (
    READY,
    SOURCE,
    TINY_PREFIX,
    Stack,
    blobscore_env,
    cpu_s,
    delete_container,
    listing_in_process,
    r3,
    run_cli,
    settings_for,
    start_stack,
    upload_images,
    wait_until_done,
)

from deploy.local.procs import ManagedProcess, free_port
from worker.contracts import TASK_NAME

VARIANTS = ("shipped", "remote_control", "events", "events_flower")
FLOWER_AUTH = ("bench", "bench-flower-not-a-secret")
# Every worker of this benchmark starts through this (cwd: the logs directory; blobscore is installed).
LAUNCHER = """
import os
import worker.celery_app as celery_app
if os.environ.get("BENCH_TASK_EVENTS") == "1":
    shipped = celery_app.celery_config
    celery_app.celery_config = lambda settings: {**shipped(settings), "worker_send_task_events": True}
from worker.worker_main import main
main()
"""
ENABLED_BY_REMOTE = "Events of group {task} enabled by remote"


def _variant_env(env: dict[str, str], variant: str) -> dict[str, str]:
    out = dict(env)
    out["BLOBSCORE_WORKER_REMOTE_CONTROL"] = "false" if variant == "shipped" else "true"
    out["BENCH_TASK_EVENTS"] = "1" if variant in ("events", "events_flower") else "0"
    out["BLOBSCORE_FLOWER_AUTH"] = ":".join(FLOWER_AUTH)
    return out


def _start_worker(env: dict[str, str], log: Path, inflight: int) -> ManagedProcess:
    process = ManagedProcess.start([sys.executable, "-c", LAUNCHER], log,
                                   env={**env, "BLOBSCORE_WORKER_CONCURRENCY": str(inflight)}, cwd=log.parent)
    deadline = time.monotonic() + 90
    while not READY.search(log.read_text(errors="replace")):
        if not process.alive():
            raise RuntimeError(f"worker exited on start:\n{process.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker not ready in 90 s:\n{process.log_tail()}")
        time.sleep(0.02)
    return process


def _start_flower(env: dict[str, str], log: Path) -> tuple[ManagedProcess, int]:
    port = free_port()
    process = ManagedProcess.start([sys.executable, "-m", "producer.flower_cli", "--port", str(port)], log, env=env,
                                   cwd=log.parent)
    process.wait_for_port("127.0.0.1", port, timeout=60, what="blobscore flower")
    return process, port


def _flower_tasks(port: int) -> dict[str, int]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/tasks?limit=100000")
    token = base64.b64encode(":".join(FLOWER_AUTH).encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (our own Flower on loopback)
        tasks = json.loads(response.read())
    states: dict[str, int] = {}
    for task in tasks.values():
        states[str(task.get("state"))] = states.get(str(task.get("state")), 0) + 1
    return states


def _enable_events_reply(env: dict[str, str]) -> list[Any]:
    """What the workers answer to the `enable_events` Flower broadcasts (asked here once, with replies), on the
    deployment's own control exchange."""
    from worker.celery_app import publisher_app

    replies: list[Any] = publisher_app(settings_for(env)).control.enable_events(reply=True, timeout=2)
    return replies


def run_variant(stack: Stack, base_env: dict[str, str], variant: str, tag: str, images: int, inflight: int,
                settle_s: float) -> dict[str, Any]:
    """One run: a fresh broker database, a worker (and Flower), `images` images; CPU per image."""
    env = _variant_env(base_env, variant)
    logs = stack.workdir / "logs"
    client = stack.redis()
    client.flushdb()
    results = f"res-{tag}".replace("_", "-")
    service = stack.blob_service()
    service.create_container(results)
    service.close()
    worker = _start_worker(env, logs / f"{tag}-worker.log", inflight)
    flower: ManagedProcess | None = None
    flower_port = 0
    try:
        if variant in ("remote_control", "events_flower"):
            flower, flower_port = _start_flower(env, logs / f"{tag}-flower.log")
        idle_cpu, idle_at = cpu_s(worker.pid), time.monotonic()
        time.sleep(settle_s)  # past Flower's first enable_events broadcast (5 s after it starts)
        idle_rate = (cpu_s(worker.pid) - idle_cpu) / (time.monotonic() - idle_at)
        pids = {"worker": worker.pid, "redis": stack.redis_proc.pid, **({"flower": flower.pid} if flower else {})}
        before = {name: cpu_s(pid) for name, pid in pids.items()}
        started = time.time()
        enqueued, _ = run_cli(env, logs, "enqueue", *listing_in_process(), "--container", SOURCE, "--prefix",
                              TINY_PREFIX, "--results-container", results, "--results-prefix", f"{tag}/",
                              "--limit", str(images))
        done_at, _, final = wait_until_done(env, enqueued["job_id"], timeout=300)
        spent = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
        listed = int(enqueued["listed"])
        elapsed = done_at - started
        out: dict[str, Any] = {
            "variant": variant, "images": listed, "job_state": final["state"], "ok": final["ok"],
            "elapsed_s": r3(elapsed),
            "worker_cpu_ms_per_image": r3(spent["worker"] * 1000 / listed),
            "worker_busy_cpu_ms_per_image": r3((spent["worker"] - idle_rate * elapsed) * 1000 / listed),
            "worker_idle_cpu_pct": r3(idle_rate * 100),
            "redis_cpu_ms_per_image": r3(spent["redis"] * 1000 / listed),
        }
        if flower is not None:
            time.sleep(1.0)  # the last events reach Flower
            out["flower_cpu_ms_per_image"] = r3(spent["flower"] * 1000 / listed)
            out["flower_tasks"] = _flower_tasks(flower_port)
        out["enabled_by_remote"] = ENABLED_BY_REMOTE in worker.log.read_text(errors="replace")
        if variant == "remote_control":
            out["enable_events_reply"] = _enable_events_reply(env)
        return out
    finally:
        if flower is not None:
            flower.stop()
        worker.stop(timeout=20)
        delete_container(stack, results)
        client.flushdb()
        client.close()


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return r3(statistics.median(values)) if values else None


def end_to_end(stack: Stack, images: int, inflight: int, rounds: int, settle_s: float) -> dict[str, Any]:
    scoring_port = next(iter(stack.standins.values()))[1]
    base_env = blobscore_env(stack, scoring_port, f"ev-{uuid.uuid4().hex[:6]}")
    runs: list[dict[str, Any]] = []
    for number in range(rounds):
        order = VARIANTS if number % 2 == 0 else tuple(reversed(VARIANTS))
        for variant in order:
            run = run_variant(stack, base_env, variant, f"r{number}-{variant}", images, inflight, settle_s)
            print(json.dumps(run), file=sys.stderr, flush=True)
            runs.append(run)
    summary: dict[str, Any] = {}
    for variant in VARIANTS:
        mine = [run for run in runs if run["variant"] == variant]
        summary[variant] = {key: _median(mine, key) for key in (
            "worker_cpu_ms_per_image", "worker_busy_cpu_ms_per_image", "worker_idle_cpu_pct",
            "redis_cpu_ms_per_image", "flower_cpu_ms_per_image", "elapsed_s")}
        summary[variant]["enabled_by_remote"] = any(run["enabled_by_remote"] for run in mine)
        summary[variant]["flower_tasks"] = [run.get("flower_tasks") for run in mine if "flower_tasks" in run]
        if variant == "remote_control":
            summary[variant]["enable_events_reply"] = mine[-1].get("enable_events_reply")

    def delta(key: str, on: str, off: str) -> float | None:
        high, low = summary[on][key], summary[off][key]
        return r3(high - low) if high is not None and low is not None else None

    summary["events_minus_remote_control_busy_cpu_ms_per_image"] = delta(
        "worker_busy_cpu_ms_per_image", "events", "remote_control")
    summary["events_flower_minus_remote_control_busy_cpu_ms_per_image"] = delta(
        "worker_busy_cpu_ms_per_image", "events_flower", "remote_control")
    summary["remote_control_minus_shipped_busy_cpu_ms_per_image"] = delta(
        "worker_busy_cpu_ms_per_image", "remote_control", "shipped")
    summary["events_minus_remote_control_redis_cpu_ms_per_image"] = delta(
        "redis_cpu_ms_per_image", "events", "remote_control")
    return {"images": images, "inflight": inflight, "rounds": rounds, "runs": runs, "summary": summary}


def event_loop(redis_url: str, loops: int) -> dict[str, Any]:
    """CPU and wall µs per task of a worker's three task events through Celery's EventDispatcher."""
    from celery import Celery

    app = Celery("bench-events", broker=redis_url)
    app.conf.update(accept_content=["json"], task_serializer="json", event_serializer="json")
    results: dict[str, Any] = {}
    with app.connection_for_write() as connection:
        dispatcher = app.events.Dispatcher(connection, hostname="celery@bench", enabled=True, buffer_group=["task"])

        def one_task(index: int) -> None:
            task_id = str(uuid.uuid4())
            dispatcher.send("task-received", uuid=task_id, name=TASK_NAME, args=f"[20260101T000000-abcdef12:{index}]",
                            kwargs="{}", root_id=task_id, parent_id=None, retries=0, eta=None, expires=None)
            dispatcher.send("task-started", uuid=task_id)
            dispatcher.send("task-succeeded", uuid=task_id, result="None", runtime=0.0123)

        for flush_every, label in ((0, "flush_every_event"), (8, "flush_every_8_tasks")):
            for index in range(200):  # warm: connection, exchange declared
                one_task(index)
                dispatcher.flush()
            cpu, wall = time.process_time(), time.perf_counter()
            for index in range(loops):
                if flush_every:
                    one_task(index)
                    if index % flush_every == flush_every - 1:
                        dispatcher.flush()
                else:
                    task_id = str(uuid.uuid4())
                    for event, fields in (
                        ("task-received", {"name": TASK_NAME, "args": f"[20260101T000000-abcdef12:{index}]",
                                           "kwargs": "{}", "root_id": task_id, "parent_id": None, "retries": 0,
                                           "eta": None, "expires": None}),
                        ("task-started", {}),
                        ("task-succeeded", {"result": "None", "runtime": 0.0123}),
                    ):
                        dispatcher.send(event, uuid=task_id, **fields)
                        dispatcher.flush()
            dispatcher.flush()
            results[label] = {"cpu_us_per_task": round((time.process_time() - cpu) / loops * 1e6, 1),
                              "wall_us_per_task": round((time.perf_counter() - wall) / loops * 1e6, 1),
                              "tasks": loops, "events_per_task": 3}
        dispatcher.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="tiny images per run")
    parser.add_argument("--inflight", type=int, default=8, help="worker threads")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant (alternating order)")
    parser.add_argument("--settle-s", type=float, default=6.0, help="idle time measured before each enqueue")
    parser.add_argument("--loops", type=int, default=10_000, help="tasks of the event loop")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--workdir", type=Path, help="keep the logs here (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blobscore-events-bench-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        stack = start_stack(workdir, [0.0], standin_workers=args.inflight + 8)
        try:
            out: dict[str, Any] = {"event_loop": event_loop(stack.redis_url, args.loops)}
            if not args.skip_end_to_end:
                out["corpus"] = upload_images(stack, args.images)
                out["end_to_end"] = end_to_end(stack, args.images, args.inflight, args.rounds, args.settle_s)
        finally:
            stack.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
