"""Fast reclaim: a dead or paused worker's images come back within seconds, with the visibility timeout at 240 s.

The visibility timeout is the production default here, so any recovery well under it can only come from the
leases (worker/leases.py): a live worker, or `blobscore beat` when no worker is left, requeues a dead one's images.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import REPO, Processes, assert_clean, held, kill9, start_worker, wait_for
from shared_helpers import jpeg_bytes

from deploy.local.procs import ManagedProcess, free_port
from deploy.local.redis_local import start_redis

Report = Callable[[dict[str, Any]], None]
# The production default (and more than any lease takes): recovery below it is the leases' work.
LONG_VISIBILITY = {"BLOBSCORE_VISIBILITY_TIMEOUT_S": "240"}
SLOW_PREDICT_MS = "1500"
# Lease TTL (15 s) + a heartbeat (5 s) + time to score what was requeued: far below the 240 s visibility timeout.
RECLAIM_BOUND_S = 45
RESTARTS = 20
# The bound from the last Redis restart to the job's end (300 images, 2 workers).
LAST_RESTART_TO_DONE_S = 60


def _images(count: int, seed: int) -> dict[str, bytes]:
    return {f"img-{index:02d}.jpg": jpeg_bytes(seed + index, (96, 72)) for index in range(count)}


@pytest.mark.timeout(120)
def test_kill9_of_a_worker_its_images_are_finished_by_the_other_within_seconds(
    make_job: Any, procs: Processes, fault_report: Report
) -> None:
    job = make_job(extra=LONG_VISIBILITY)
    job.start_standin(procs, "--delay-ms", SLOW_PREDICT_MS)
    job.upload(_images(8, seed=500))
    doomed = start_worker(procs, job.env, job.workdir / "worker-doomed.log", concurrency=2)
    job.enqueue()
    wait_for(lambda: len(held(job)) == 2, 30, "the doomed worker busy")
    start_worker(procs, job.env, job.workdir / "worker-survivor.log", concurrency=2)
    dead_held = held(job)
    killed_at = kill9(doomed)
    done_at = job.wait_done(RECLAIM_BOUND_S)
    tally = job.tally(recovery_s=round(done_at - killed_at, 1), held_at_kill=dead_held)
    fault_report(tally)
    assert_clean(tally)
    assert tally["ok"] == 8
    assert tally["scorer_calls_max"] <= 2
    assert "requeued now" in (job.workdir / "worker-survivor.log").read_text()


@pytest.mark.timeout(150)
def test_a_paused_worker_whose_lease_was_taken_over_doubles_nothing(
    make_job: Any, procs: Processes, fault_report: Report
) -> None:
    job = make_job(extra=LONG_VISIBILITY)
    job.start_standin(procs, "--delay-ms", SLOW_PREDICT_MS)
    job.upload(_images(8, seed=600))
    paused = start_worker(procs, job.env, job.workdir / "worker-paused.log", concurrency=2)
    job.enqueue()
    wait_for(lambda: len(held(job)) == 2, 30, "the worker to be paused busy")
    start_worker(procs, job.env, job.workdir / "worker-other.log", concurrency=2)
    os.kill(paused.pid, signal.SIGSTOP)  # a long GC, a frozen VM, a network partition
    stopped_at = time.monotonic()
    try:
        done_at = job.wait_done(RECLAIM_BOUND_S)
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    # The paused worker wakes up with its old tasks: they finish against results that exist already.
    wait_for(lambda: "taken over" in (job.workdir / "worker-paused.log").read_text(), 30,
             "the paused worker to notice its lease was taken over")
    time.sleep(3)  # its in-flight Predicts (1.5 s) finish and try to write
    tally = job.tally(recovery_s=round(done_at - stopped_at, 1))
    fault_report(tally)
    assert_clean(tally)
    assert tally["ok"] == 8
    assert all(count == 1 for count in job.result_writes().values()), job.result_writes()


@pytest.mark.timeout(150)
def test_with_every_worker_gone_beat_requeues_their_images(
    make_job: Any, procs: Processes, fault_report: Report
) -> None:
    """Scale-to-zero (or a lost node) must not strand unacknowledged images: `blobscore beat` reclaims them."""
    job = make_job(extra=LONG_VISIBILITY)
    job.start_standin(procs, "--delay-ms", SLOW_PREDICT_MS)
    job.upload(_images(4, seed=700))
    only = start_worker(procs, job.env, job.workdir / "worker-only.log", concurrency=2)
    job.enqueue()
    wait_for(lambda: len(held(job)) == 2, 30, "the only worker busy")
    time.sleep(1.0)  # its lease publishes what it holds within half a second; the Predicts take 1.5 s
    killed_at = kill9(only)
    beat = procs.track(ManagedProcess.start([sys.executable, "-m", "producer.cli", "beat"],
                                            job.workdir / "beat.log", env=job.env, cwd=REPO))
    wait_for(lambda: not held(job), RECLAIM_BOUND_S, "beat to requeue the dead worker's images")
    requeued_at = time.monotonic()
    assert beat.alive()
    start_worker(procs, job.env, job.workdir / "worker-new.log", concurrency=2)
    done_at = job.wait_done(60)
    tally = job.tally(requeued_s=round(requeued_at - killed_at, 1), recovery_s=round(done_at - killed_at, 1))
    fault_report(tally)
    assert_clean(tally)
    assert tally["ok"] == 4


@pytest.mark.timeout(300)
def test_twenty_redis_restarts_in_a_row_never_stop_a_worker_and_the_job_ends_soon_after(
    make_job: Any, procs: Processes, fault_report: Report, tmp_path: Path
) -> None:
    """Two workers, 300 images; the broker (append-only, fsync always) is restarted 20 times, 1–2 s apart. No
    worker process may exit, nothing is lost or doubled, and the job ends soon after the last restart even though
    the visibility timeout is 240 s: acknowledgements lost in a restart are requeued by the worker's lease."""
    port, data_dir = free_port(), tmp_path / "redis-data"
    server = procs.track(start_redis(port, data_dir, appendonly=True))
    job = make_job(broker_url=f"redis://127.0.0.1:{port}/0", extra=LONG_VISIBILITY)
    # About 8 images/s: the job is still running at the last restart, with images in flight through every one.
    job.start_standin(procs, "--emulate-latency-ms", "1000")
    job.upload(_images(300, seed=2000))
    workers = [start_worker(procs, job.env, job.workdir / f"worker-{number}.log", concurrency=4) for number in (1, 2)]
    job.enqueue()
    wait_for(lambda: job.status()["ok"] >= 10, 60, "ten images scored")
    for _ in range(RESTARTS):
        server.stop()  # TERM: Redis writes its AOF out and exits
        time.sleep(0.3)
        server = procs.track(start_redis(port, data_dir, appendonly=True))
        time.sleep(1.2)
        assert all(worker.alive() for worker in workers), "a worker process exited across a Redis restart"
    last_restart_at = time.monotonic()
    done_at = job.wait_done(LAST_RESTART_TO_DONE_S)
    logs = "".join(worker.log.read_text() for worker in workers)
    tally = job.tally(recovery_s=round(done_at - last_restart_at, 1), redis_restarts=RESTARTS,
                      worker_exits=sum(not worker.alive() for worker in workers))
    fault_report(tally)
    assert_clean(tally)
    assert tally["ok"] == 300
    assert tally["worker_exits"] == 0
    assert "Unrecoverable error" not in logs
    assert last_restart_at < done_at, "the job ended before the restarts did: nothing was in flight"
