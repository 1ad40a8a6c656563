"""The one retry policy: which errors are retried, and after how long (pure)."""

from __future__ import annotations

import random

from worker.errors import ConfigurationError, TransientError

RETRYABLE = (TransientError, ConfigurationError)
BASE_DELAY_S = 1.0


def should_retry(exc: BaseException) -> bool:
    """Transient failures and configuration errors wait and retry; an image is never rejected for them."""
    return isinstance(exc, RETRYABLE)


def backoff_delay(attempt: int, cap_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(cap_s, BASE_DELAY_S * (2 ** min(attempt, 30)))
    return (rng or random).uniform(0.0, ceiling)


def failed_attempts(retries: int, breaker_waits: int) -> int:
    """Failed attempts of an image so far: Celery's retry count without the waits for an open circuit breaker.

    A long outage holds tasks off the service through the breaker; those waits must not use up the retry budget.
    """
    return max(retries - breaker_waits, 0)
