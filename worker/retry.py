"""The one retry policy: for any error of one image's attempt, retry after how long or give up with which code (pure).

The task calls `decide` once per failed attempt; nothing else chooses limits, delays or give-up codes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from worker.errors import CircuitOpenError, ConfigurationError, RejectionCode, TransientError

RETRYABLE = (TransientError, ConfigurationError)
BASE_DELAY_S = 1.0
# An unexpected exception is probably a bug, not an outage: a few retries, then a clear error record.
MAX_UNEXPECTED_RETRIES = 3


@dataclass(frozen=True)
class RetryPolicy:
    """The policy's numbers, from the settings."""

    max_transient_retries: int
    backoff_max_s: float
    max_crash_attempts: int


@dataclass(frozen=True)
class RetryAfter:
    """Try the image again after `countdown_s`; `breaker_wait` when it only waits for an open breaker."""

    countdown_s: float
    breaker_wait: bool = False


@dataclass(frozen=True)
class GiveUp:
    """Stop trying: the image gets a `rejected` record with this code (a later job tries it again)."""

    code: RejectionCode
    message: str


Decision = RetryAfter | GiveUp


def should_retry(exc: BaseException) -> bool:
    """Transient failures and configuration errors wait and retry; an image is never rejected for them."""
    return isinstance(exc, RETRYABLE)


def decide(
    error: BaseException, retries: int, breaker_waits: int, policy: RetryPolicy, rng: random.Random | None = None
) -> Decision:
    """What to do after one failed attempt of an image.

    An open circuit breaker is not a failed attempt: wait it out, spread over up to twice its remaining time so the
    queue does not stampede when it closes. Otherwise retryable errors get exponential backoff with full jitter up to
    `max_transient_retries` failed attempts, anything unexpected a few, then the image is given up.
    """
    rng = rng or random.Random()
    if isinstance(error, CircuitOpenError):
        return RetryAfter(error.remaining_s + rng.uniform(0, error.remaining_s), breaker_wait=True)
    attempt = failed_attempts(retries, breaker_waits)
    retryable = should_retry(error)
    limit = policy.max_transient_retries if retryable else MAX_UNEXPECTED_RETRIES
    if attempt >= limit:
        code = RejectionCode.RETRIES_EXHAUSTED if retryable else RejectionCode.INTERNAL_ERROR
        return GiveUp(code, f"gave up after {attempt + 1} attempts: {error}")
    return RetryAfter(backoff_delay(attempt, policy.backoff_max_s, rng))


def is_poison_pill(unfinished_starts: int, policy: RetryPolicy) -> bool:
    """True when an image's task started more often than allowed without finishing (it crashes or hangs workers)."""
    return unfinished_starts > policy.max_crash_attempts


POISON_PILL_MESSAGE = "scoring this image crashed or hung the worker on every attempt"


def backoff_delay(attempt: int, cap_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(cap_s, BASE_DELAY_S * (2 ** min(attempt, 30)))
    return (rng or random).uniform(0.0, ceiling)


def failed_attempts(retries: int, breaker_waits: int) -> int:
    """Failed attempts of an image so far: Celery's retry count without the waits for an open circuit breaker.

    A long outage holds tasks off the service through the breaker; those waits must not use up the retry budget.
    """
    return max(retries - breaker_waits, 0)
