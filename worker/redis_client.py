"""The one way blobscore opens Redis (one set of timeouts and decoding) and turns its errors into ours."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from worker.errors import BlobscoreError, TransientError

# A Redis that does not answer within these is treated as down (our TransientError), never waited on forever.
SOCKET_TIMEOUT_S = 10
CONNECT_TIMEOUT_S = 5
# Connections idle longer than this are checked before use: a restarted Redis is noticed on the next command.
HEALTH_CHECK_INTERVAL_S = 30


def open_redis(url: str, timeout_s: float | None = None) -> redis.Redis:
    """A client with its own connection pool; replies decoded to str (binary values: NEVER_DECODE per command).

    `timeout_s` shortens both timeouts, for callers that must answer quickly (health probes).
    """
    return redis.Redis.from_url(
        url, decode_responses=True, socket_timeout=timeout_s or SOCKET_TIMEOUT_S,
        socket_connect_timeout=timeout_s or CONNECT_TIMEOUT_S, health_check_interval=HEALTH_CHECK_INTERVAL_S,
    )


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Redis errors as ours, with what failed: unreachable or slow is transient, anything else says what happened."""
    try:
        yield
    except redis.ConnectionError as exc:
        raise TransientError(f"{what}: Redis unreachable") from exc
    except redis.TimeoutError as exc:
        raise TransientError(f"{what}: Redis timed out") from exc
    except redis.RedisError as exc:
        raise BlobscoreError(f"{what}: {exc}") from exc
