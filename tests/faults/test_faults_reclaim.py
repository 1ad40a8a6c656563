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
from typing import Any

import pytest
from fault_helpers import REPO, Processes, assert_clean, held, kill9, start_worker, wait_for
from shared_helpers import jpeg_bytes

from deploy.local.procs import ManagedProcess

Report = Callable[[dict[str, Any]], None]
# The production default (and more than any lease takes): recovery below it is the leases' work.
LONG_VISIBILITY = {"BLOBSCORE_VISIBILITY_TIMEOUT_S": "240"}
SLOW_PREDICT_MS = "1500"
# Lease TTL (15 s) + a heartbeat (5 s) + time to score what was requeued: far below the 240 s visibility timeout.
RECLAIM_BOUND_S = 45


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
