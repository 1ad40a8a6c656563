"""Crashes: kill -9 of a worker mid-task, a crash between the result upload and the ack, warm shutdown, poison pills.

Each test runs a job of real JPEGs through real processes and ends with a tally: nothing lost, nothing doubled.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from fault_helpers import (
    VISIBILITY_TIMEOUT_S,
    KillOnResultWriteProxy,
    Processes,
    assert_clean,
    attempts_of,
    held,
    kill9,
    start_worker,
    term,
    wait_exit,
    wait_for,
)
from shared_helpers import jpeg_bytes, settings_of

Report = Callable[[dict[str, Any]], None]
# A Predict takes this long at the stand-in, so a task is reliably "in flight" when we strike.
SLOW_PREDICT_MS = "1000"


def _images(count: int, seed: int = 0) -> dict[str, bytes]:
    return {f"img-{index:02d}.jpg": jpeg_bytes(seed + index, (96, 72)) for index in range(count)}


@pytest.mark.timeout(90)
def test_kill9_of_the_only_worker_mid_task_then_a_restarted_worker_finishes(
    make_job: Any, procs: Processes, fault_report: Report
) -> None:
    """Scenario 1. The thread pool has no child process: the worker process itself dies with tasks in flight."""
    job = make_job()
    job.start_standin(procs, "--delay-ms", SLOW_PREDICT_MS)
    job.upload(_images(6))
    worker = start_worker(procs, job.env, job.workdir / "worker-1.log", concurrency=2)
    job.enqueue()
    wait_for(lambda: len(held(job)) == 2, 30, "two tasks in flight")
    time.sleep(0.2)  # well inside the 1 s Predict
    dead_held = held(job)
    killed_at = kill9(worker)
    start_worker(procs, job.env, job.workdir / "worker-2.log", concurrency=2)
    done_at = job.wait_done(VISIBILITY_TIMEOUT_S + 30)
    tally = job.tally(recovery_s=round(done_at - killed_at, 1), held_by_killed_worker=dead_held)
    fault_report(tally)
    assert_clean(tally)
    assert tally["ok"] == 6
    # The images the dead worker held were scored again (at most twice), the others once.
    calls = job.scorer_calls()
    assert all(calls[name] <= 2 for name in dead_held), calls
    assert all(calls[name] == 1 for name in calls if name not in dead_held), calls


@pytest.mark.timeout(90)
def test_kill9_of_a_whole_worker_while_a_second_worker_runs(
    make_job: Any, procs: Processes, fault_report: Report
) -> None:
    """Scenario 2. The survivor takes the dead worker's images back once their visibility timeout expires."""
    job = make_job()
    job.start_standin(procs, "--delay-ms", SLOW_PREDICT_MS)
    job.upload(_images(10, seed=100))
    doomed = start_worker(procs, job.env, job.workdir / "worker-doomed.log", concurrency=2)
    job.enqueue()
    wait_for(lambda: len(held(job)) == 2, 30, "the doomed worker busy")
    start_worker(procs, job.env, job.workdir / "worker-survivor.log", concurrency=2)
    # Both busy: the doomed worker always holds two images while the queue is not empty.
    wait_for(lambda: len(held(job)) == 4, 30, "both workers busy")
    killed_at = kill9(doomed)
    done_at = job.wait_done(VISIBILITY_TIMEOUT_S + 30)
    tally = job.tally(recovery_s=round(done_at - killed_at, 1))
    fault_report(tally)
    assert_clean(tally)
    assert tally["ok"] == 10
    assert tally["scorer_calls_max"] <= 2
    # The dead worker's images came back through the visibility timeout, not before it.
    assert done_at - killed_at >= VISIBILITY_TIMEOUT_S - 2


@pytest.mark.timeout(90)
def test_crash_after_the_result_upload_before_the_ack_is_not_scored_again(
    make_job: Any, procs: Processes, fault_report: Report, faults_azurite: Any
) -> None:
    """Scenario 3. A proxy kills the worker the moment Azurite answers its first result upload: the result exists,
    the job never counted it and the message was never acked. The redelivery must find it and not score again."""
    from deploy.local.azurite import connection_string

    job = make_job()
    job.start_standin(procs)
    job.upload(_images(4, seed=200))
    proxy = KillOnResultWriteProxy(faults_azurite.port, f"/devstoreaccount1/{job.container}/{job.results_prefix}")
    try:
        proxied = connection_string(faults_azurite.port).replace(
            f"127.0.0.1:{faults_azurite.port}", f"127.0.0.1:{proxy.port}"
        )
        # The same account through another endpoint: the namespace is pinned, as a user behind a proxy would.
        worker = start_worker(procs, job.env, job.workdir / "worker-1.log", concurrency=1,
                              extra={"BLOBSCORE_BLOB_CONNECTION_STRING": proxied,
                                     "BLOBSCORE_NAMESPACE": settings_of(job.env).namespace_in_use})
        proxy.victim = worker
        proxy.armed.set()
        job.enqueue()
        wait_for(proxy.fired.is_set, 30, "the first result upload")
    finally:
        proxy.close()
    assert proxy.written_result is not None
    victim = proxy.written_result.rsplit(job.results_prefix, 1)[1].removesuffix(".json")
    assert job.result_exists(victim)
    assert victim not in job.counted("ok")  # counted by nobody yet
    start_worker(procs, job.env, job.workdir / "worker-2.log", concurrency=1)
    done_at = job.wait_done(VISIBILITY_TIMEOUT_S + 30)
    tally = job.tally(recovery_s=round(done_at - proxy.killed_at, 1), crashed_after_upload=victim)
    fault_report(tally)
    assert_clean(tally)
    assert tally["ok"] == 4
    assert job.scorer_calls()[victim] == 1, "the redelivered task scored the image again"
    assert job.result_writes()[victim] == 1


@pytest.mark.timeout(90)
def test_warm_shutdown_finishes_running_tasks_and_leaves_the_rest_queued(
    make_job: Any, procs: Processes, fault_report: Report
) -> None:
    """Scenario 4a. TERM while two tasks run (shorter than the soft shutdown timeout): they finish and are acked,
    nothing waits for a visibility timeout, and a new worker takes the rest at once."""
    job = make_job()
    job.start_standin(procs, "--delay-ms", SLOW_PREDICT_MS)
    job.upload(_images(8, seed=300))
    worker = start_worker(procs, job.env, job.workdir / "worker-1.log", concurrency=2)
    job.enqueue()
    wait_for(lambda: len(held(job)) == 2, 30, "two tasks in flight")
    time.sleep(0.3)
    running = held(job)
    termed_at = term(worker)
    exited_at = wait_exit(worker, 3 + 10)
    assert all(job.result_exists(name) for name in running), "running tasks did not finish in the soft shutdown"
    assert held(job) == [], "the warm shutdown left messages waiting for the visibility timeout"
    start_worker(procs, job.env, job.workdir / "worker-2.log", concurrency=2)
    done_at = job.wait_done(60)
    tally = job.tally(recovery_s=round(done_at - termed_at, 1), shutdown_s=round(exited_at - termed_at, 1))
    fault_report(tally)
    assert_clean(tally)
    assert tally["ok"] == 8
    assert tally["scorer_calls_max"] == 1  # nothing redone


@pytest.mark.timeout(90)
def test_quit_with_tasks_running_past_the_soft_shutdown_timeout_loses_nothing(
    make_job: Any, procs: Processes, fault_report: Report
) -> None:
    """Scenario 4b. TERM is a warm shutdown that waits for running tasks however long they take (Celery applies the
    soft shutdown timeout to a cold shutdown only). QUIT, the cold one, with tasks running longer than the soft
    shutdown timeout (3 s): the thread pool cannot cancel them (Celery logs an unrecoverable NotImplementedError
    from kill_job), so they run to their end while the worker goes down; whatever their messages' fate, every image
    must end with one result."""
    # A Predict of 4 s is slow, not failed (deadline 5 s; the validator: 2 + 5 < 8).
    job = make_job(extra={"BLOBSCORE_SCORING_TIMEOUT_S": "5", "BLOBSCORE_TASK_TIME_LIMIT_S": "5",
                          "BLOBSCORE_VISIBILITY_TIMEOUT_S": "8"})
    job.start_standin(procs, "--delay-ms", "4000")
    job.upload(_images(4, seed=400))
    worker = start_worker(procs, job.env, job.workdir / "worker-1.log", concurrency=2)
    job.enqueue()
    wait_for(lambda: len(held(job)) == 2, 30, "two tasks in flight")
    time.sleep(0.3)
    running = held(job)
    quit_at = time.monotonic()
    os.kill(worker.pid, signal.SIGQUIT)
    exited_at = wait_exit(worker, 3 + 10)
    finished = [name for name in running if job.result_exists(name)]
    start_worker(procs, job.env, job.workdir / "worker-2.log", concurrency=4)
    done_at = job.wait_done(VISIBILITY_TIMEOUT_S + 30)
    tally = job.tally(recovery_s=round(done_at - quit_at, 1), shutdown_s=round(exited_at - quit_at, 1),
                      running_at_quit=running, finished_by_the_dying_worker=finished)
    fault_report(tally)
    assert_clean(tally)
    assert tally["ok"] == 4
    assert tally["scorer_calls_max"] <= 2


@pytest.mark.timeout(120)
def test_poison_pill_that_kills_the_worker_every_time_is_rejected_as_too_many_attempts(
    make_job: Any, procs: Processes, fault_report: Report
) -> None:
    """An image whose task never finishes (here: the worker is killed whenever it holds it) ends `rejected` with
    `too_many_attempts` instead of looping forever. A first delivery is not counted (it costs no Redis call); every
    redelivered start is, so with BLOBSCORE_MAX_CRASH_ATTEMPTS=1 the second redelivery is refused."""
    job = make_job(extra={"BLOBSCORE_MAX_CRASH_ATTEMPTS": "1"})
    job.start_standin(procs, "--delay-ms", "1000")
    poison = "z-poison.jpg"
    job.upload({**_images(2, seed=500), poison: jpeg_bytes(599, (96, 72))})
    worker = start_worker(procs, job.env, job.workdir / "worker-1.log", concurrency=1)
    job.enqueue()  # FIFO: the two healthy images first, the poison last
    wait_for(lambda: held(job) == [poison], 30, "the poison pill in flight (first delivery)")
    crash_times = [kill9(worker)]
    worker = start_worker(procs, job.env, job.workdir / "worker-2.log", concurrency=1)
    wait_for(lambda: attempts_of(job, poison) == 1, VISIBILITY_TIMEOUT_S + 30, "the poison pill redelivered")
    crash_times.append(kill9(worker))
    start_worker(procs, job.env, job.workdir / "worker-3.log", concurrency=1)
    done_at = job.wait_done(VISIBILITY_TIMEOUT_S + 30)
    tally = job.tally(recovery_s=round(done_at - crash_times[-1], 1), crashes=len(crash_times))
    fault_report(tally)
    assert_clean(tally)
    assert tally["ok"] == 2
    assert tally["rejected_codes"] == {"too_many_attempts": 1}
    assert job.results()[poison]["error"]["code"] == "too_many_attempts"
    # The kills land anywhere between the start and the Predict's reply; the third start never calls the scorer.
    assert job.scorer_calls()[poison] <= 2
