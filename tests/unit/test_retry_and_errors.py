"""The retry policy and how gRPC statuses map onto our errors."""

import random

import grpc
import pytest

from worker.errors import ConfigurationError, PermanentError, RejectionCode, TransientError
from worker.retry import backoff_delay, failed_attempts, should_retry
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
