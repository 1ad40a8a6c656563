"""Our typed errors: Transient (retry later) vs Permanent (reject the image now) — all retry policy looks at."""

from __future__ import annotations

from enum import StrEnum


class RejectionCode(StrEnum):
    """Why an image can never be scored; the `error.code` of a rejected result."""

    EMPTY = "empty"
    TOO_LARGE = "too_large"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TRUNCATED = "truncated"
    TOO_MANY_PIXELS = "too_many_pixels"
    SOURCE_MISSING = "source_missing"
    UNADDRESSABLE_NAME = "unaddressable_name"
    SCORER_REJECTED = "scorer_rejected"
    BAD_MODEL_OUTPUT = "bad_model_output"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    RETRIES_EXHAUSTED = "retries_exhausted"
    INTERNAL_ERROR = "internal_error"


class BlobscoreError(Exception):
    """Base of every error blobscore raises on purpose."""


class TransientError(BlobscoreError):
    """A failure that may go away by itself (outage, throttling, timeout): retry the image later."""


class PermanentError(BlobscoreError):
    """A failure that retrying cannot fix: the image gets a `rejected` result with `code`."""

    def __init__(self, code: RejectionCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConfigurationError(BlobscoreError):
    """The settings cannot work (wrong key, unknown service, missing route): fix the configuration, not the image."""


class CircuitOpenError(TransientError):
    """The scoring service failed repeatedly: nobody calls it until the breaker closes again."""

    def __init__(self, service: str, remaining_s: float, reason: str | None = None) -> None:
        why = f": {reason}" if reason else ""
        super().__init__(f"circuit open for service {service!r} for {remaining_s:.1f} s more{why}")
        self.remaining_s = remaining_s
        self.reason = reason
