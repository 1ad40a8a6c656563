"""The retry policy and how gRPC statuses map onto our errors."""

import random

import grpc
import pytest

from worker.errors import CircuitOpenError, ConfigurationError, PermanentError, RejectionCode, TransientError
from worker.retry import (
    GiveUp,
    RetryAfter,
    RetryPolicy,
    backoff_delay,
    decide,
    failed_attempts,
    is_poison_pill,
    should_retry,
)
from worker.scoring import error_for_status
from worker.wire import call_metadata


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED],
)
def test_outages_and_throttling_are_transient(code: grpc.StatusCode) -> None:
    error = error_for_status(code, "x")
    assert isinstance(error, TransientError)
    assert should_retry(error)


def test_invalid_argument_rejects_the_image() -> None:
    error = error_for_status(grpc.StatusCode.INVALID_ARGUMENT, "cannot decode")
    assert isinstance(error, PermanentError)
    assert error.code is RejectionCode.SCORER_REJECTED
    assert not should_retry(error)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND])
def test_wrong_key_or_route_is_configuration_and_never_rejects_images(code: grpc.StatusCode) -> None:
    error = error_for_status(code, "x")
    assert isinstance(error, ConfigurationError)
    assert should_retry(error)


def test_backoff_grows_exponentially_is_jittered_and_capped() -> None:
    rng = random.Random(3)
    delays = [backoff_delay(attempt, 60.0, rng) for attempt in range(12) for _ in range(50)]
    assert all(0.0 <= delay <= 60.0 for delay in delays)
    assert max(backoff_delay(1, 60.0, random.Random(seed)) for seed in range(50)) <= 2.0
    assert max(backoff_delay(10, 60.0, random.Random(seed)) for seed in range(50)) > 30.0
    assert len({round(delay, 6) for delay in delays[100:150]}) > 40


def test_call_metadata_is_exactly_the_fpga_services() -> None:
    assert call_metadata("k3y", "my-svc") == (
        ("authorization", "Bearer k3y"),
        ("x-ms-aml-grpc-service-route", "/api/v1/service/my-svc"),
    )
    assert call_metadata(None, None) == ()


def test_waits_for_an_open_breaker_are_not_failed_attempts() -> None:
    assert failed_attempts(retries=0, breaker_waits=0) == 0
    assert failed_attempts(retries=7, breaker_waits=5) == 2
    assert failed_attempts(retries=5, breaker_waits=5) == 0


POLICY = RetryPolicy(max_transient_retries=3, backoff_max_s=10.0, max_crash_attempts=2)


def test_decide_retries_outages_with_backoff_then_gives_up_as_retries_exhausted() -> None:
    outage = TransientError("Blob Storage answered 503")
    for retries in range(3):
        decision = decide(outage, retries, 0, POLICY, random.Random(1))
        assert isinstance(decision, RetryAfter)
        assert 0 <= decision.countdown_s <= 10.0
        assert not decision.breaker_wait
    final = decide(outage, 3, 0, POLICY)
    assert isinstance(final, GiveUp)
    assert final.code is RejectionCode.RETRIES_EXHAUSTED
    assert "gave up after 4 attempts" in final.message


def test_decide_gives_a_bug_a_few_tries_then_internal_error() -> None:
    bug = KeyError("boom")
    assert isinstance(decide(bug, 2, 0, POLICY), RetryAfter)
    final = decide(bug, 3, 0, POLICY)
    assert isinstance(final, GiveUp)
    assert final.code is RejectionCode.INTERNAL_ERROR


def test_decide_waits_out_an_open_breaker_without_spending_the_budget() -> None:
    wait = decide(CircuitOpenError("svc", 4.0), 50, 0, POLICY, random.Random(2))
    assert isinstance(wait, RetryAfter)
    assert wait.breaker_wait
    assert 4.0 <= wait.countdown_s <= 8.0
    # 50 retries of which 48 were breaker waits: 2 failed attempts, still under the limit of 3.
    assert isinstance(decide(TransientError("x"), 50, 48, POLICY), RetryAfter)


def test_a_configuration_error_is_retried_never_rejected_before_the_budget() -> None:
    assert isinstance(decide(ConfigurationError("wrong key"), 0, 0, POLICY), RetryAfter)


def test_poison_pills() -> None:
    assert not is_poison_pill(2, POLICY)
    assert is_poison_pill(3, POLICY)
