"""Two fixes to kombu's Redis restore: a message it cannot restore stays unacknowledged, and a restore on a torn-down
connection does not stop the worker.

kombu restores a message by removing it from the `unacked` hash and pushing it back on its queue in one
transaction — but when the push fails with anything other than a connection error (the chaos run hit
"'NoneType' object has no attribute 'hostname'" while a worker stopped across a Redis restart), it logs "Could not
restore message" and lets the transaction remove the message anyway: the image is lost, with no result. Raising
instead aborts the transaction; the message stays unacknowledged, and the workers' leases (worker/leases.py)
requeue it within seconds. A restore that fails this way is then skipped, so that kombu's visibility sweep, which
restores every expired message of the database in one loop, goes on with the others.

Second: when a Redis restart breaks the consumer's connection, kombu closes the channel, which restores the
messages it had delivered — through a connection pool that the same teardown has already dropped, so building a new
one reads the settings of a connection that is gone and raises AttributeError ("'NoneType' object has no attribute
'hostname'"). That error replaces the connection error Celery was handling, and Celery stops the worker
("Unrecoverable error") instead of reconnecting. Here that restore gives up quietly: the messages stay
unacknowledged; their tasks still run in the pool, and the lease requeues any message whose acknowledgement is lost
(worker/leases.py), as for any ack lost in a restart.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)
_PATCHED = "_blobscore_keeps_unrestorable"
# Unrestorable messages are reported once each, for this many at most per process.
MAX_REPORTED = 1000
_reported: set[Any] = set()


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
    qos: Any = kombu_redis.QoS
    qos.restore_by_tag = _skip_unrestorable(qos.restore_by_tag)
    qos.restore_unacked = _tolerate_torn_down(qos.restore_unacked)
    setattr(channel, _PATCHED, True)


def _skip_unrestorable(original: Any) -> Any:
    # kombu's visibility sweep restores the newest expired messages of the whole database in a loop: one message it
    # cannot restore (another deployment's, whose queue is gone) would end every sweep there, and the messages
    # behind it would never come back. Keep that one unacknowledged, say so once, and go on with the others.
    @functools.wraps(original)
    def restore_by_tag(self: Any, tag: Any, client: Any = None, leftmost: bool = False) -> bool:
        try:
            original(self, tag, client, leftmost)
        except RestoreFailedError as exc:
            if len(_reported) < MAX_REPORTED and tag not in _reported:
                _reported.add(tag)
                log.warning("message %s left unacknowledged: %s", tag, exc)
            return False
        return True

    return restore_by_tag


def _tolerate_torn_down(original: Any) -> Any:
    @functools.wraps(original)
    def restore_unacked(self: Any, client: Any = None) -> None:
        try:
            original(self, client)
        except AttributeError:
            if client is not None or getattr(self.channel.connection, "client", True) is not None:
                raise  # not the torn-down case: a real bug, let it surface
            log.warning("kombu could not put back %d delivered messages: its connection was already torn down (a "
                        "Redis restart); they stay unacknowledged until their tasks end or the lease requeues them",
                        len(self._delivered))
            self._delivered.clear()  # as after a restore: this channel is gone, and kombu asserts it is empty

    return restore_unacked
