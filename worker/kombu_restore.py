"""One fix to kombu's Redis transport: a message it cannot restore stays unacknowledged instead of being deleted.

kombu restores a message by removing it from the `unacked` hash and pushing it back on its queue in one
transaction — but when the push fails with anything other than a connection error (the chaos run hit
"'NoneType' object has no attribute 'hostname'" while a worker stopped across a Redis restart), it logs "Could not
restore message" and lets the transaction remove the message anyway: the image is lost, with no result. Raising
instead aborts the transaction; the message stays unacknowledged, and the workers' leases (worker/leases.py)
requeue it within seconds.
"""

from __future__ import annotations

import functools
from typing import Any

from kombu.transport import redis as kombu_redis

_PATCHED = "_blobscore_keeps_unrestorable"


class RestoreFailedError(RuntimeError):
    """kombu could not push a message back on its queue: keep it unacknowledged rather than lose it."""


def keep_unrestorable_messages() -> None:
    """Patch kombu's Redis channel once per process (idempotent)."""
    channel: Any = kombu_redis.Channel
    if getattr(channel, _PATCHED, False):
        return
    original = channel._do_restore_message

    @functools.wraps(original)
    def restore(self: Any, payload: Any, exchange: Any, routing_key: Any, pipe: Any, leftmost: bool = False) -> None:
        # kombu swallows every error but connection errors here; ask the lookup first, so that a failure aborts.
        try:
            queues = list(self._lookup(exchange, routing_key))
        except Exception as exc:
            raise RestoreFailedError(f"cannot restore a message to {routing_key!r}: {exc}") from exc
        del queues  # kombu looks them up again, the same way
        original(self, payload, exchange, routing_key, pipe, leftmost)

    channel._do_restore_message = restore
    setattr(channel, _PATCHED, True)
