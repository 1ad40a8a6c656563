"""The liveness rule: a worker is dead when it takes no task although work is queued and a thread is free."""

from worker.probes import STALL_S, liveness


def test_a_starting_or_busy_or_idle_worker_is_alive() -> None:
    assert liveness(ready=False, busy=0, concurrency=4, queued=100, idle_s=1e6).ok
    assert liveness(ready=True, busy=4, concurrency=4, queued=100, idle_s=1e6).ok  # every thread on a long task
    assert liveness(ready=True, busy=0, concurrency=4, queued=0, idle_s=1e6).ok  # nothing to do
    assert liveness(ready=True, busy=1, concurrency=4, queued=100, idle_s=STALL_S - 1).ok


def test_a_worker_that_stopped_taking_queued_work_is_not_alive() -> None:
    verdict = liveness(ready=True, busy=1, concurrency=4, queued=100, idle_s=STALL_S + 1)
    assert not verdict.ok
    assert "100 tasks queued" in verdict.reason
    assert "3 threads free" in verdict.reason


def test_a_broker_outage_is_readiness_business_not_liveness() -> None:
    verdict = liveness(ready=True, busy=0, concurrency=4, queued=None, idle_s=1e6)
    assert verdict.ok
    assert "broker unreachable" in verdict.reason
