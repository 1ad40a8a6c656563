"""Atomic delivery for kombu's Redis consumer: a message taken off its queue is in Redis until kombu records it.

kombu takes a message with BRPOP, which removes it from the queue at once, and only afterwards records it in its
`unacked` hash, in a separate command. Between the two the message exists nowhere but in the worker's memory — and
that gap lasts seconds under load: kombu 5.7 leaves a BRPOP reply unread in the socket while every thread is busy.
A worker killed then (kill -9, OOM, a node lost) loses the image for good; the ten-minute chaos run lost two of
18,756 this way (bench/README.md).

Here the consumer takes a message with a Lua script instead, which pops it and writes it to a landing hash in one
step (field `<worker id>|<sequence>`, value: when, which queue, the message). kombu's `QoS.append` removes the field
in the same transaction that records the message as unacknowledged, so at every moment the message is on its queue,
in the landing hash or in `unacked`. What is left in the landing hash belongs to a delivery that never completed:
the worker's own heartbeat puts it back on its queue when that delivery is over (a connection lost in the middle),
and the lease sweep does when the worker is dead (worker/landing_sweep.py, called from worker/leases.py).

A script cannot block, so an idle consumer waits with a blocking command that does not take the message — moving
the queue's last element onto the same end (BLMOVE, or BRPOPLPUSH before Redis 6.2) — on its first queue, with
kombu's BRPOP timeout, then looks at every queue again. A message on another queue waits at most that timeout (1 s)
when the worker is idle; a busy worker pops at once.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from itertools import count
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils import json as kombu_json

log = logging.getLogger(__name__)

# KEYS[1]: the landing hash; KEYS[2..]: the queue keys in BRPOP's order. ARGV[1]: this delivery's field.
POP_SCRIPT = """
for i = 2, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local now = redis.call('TIME')
    redis.call('HSET', KEYS[1], ARGV[1], now[1] .. '\\n' .. KEYS[i] .. '\\n' .. item)
    return {KEYS[i], item}
  end
end
return false
"""
_PATCHED = "_blobscore_lands_messages"
# A landing field is `<owner><FIELD_SEP><sequence>` (worker/landing_sweep.py reads the owner back).
FIELD_SEP = "|"


class Landing:
    """This process's landing: the hash, the owner (the worker's id) and the deliveries now under way."""

    def __init__(self, key: str, owner: str) -> None:
        self.key = key
        self.owner = owner
        self._sequence = count(1)
        self._pending: set[str] = set()
        self._lock = threading.Lock()

    def begin(self) -> str:
        """A field for the next pop; under way until `end` (before the command is sent: see `stale`)."""
        field = f"{self.owner}{FIELD_SEP}{next(self._sequence)}"
        with self._lock:
            self._pending.add(field)
        return field

    def end(self, field: str) -> None:
        """The delivery is over: recorded as unacknowledged, found nothing, or lost with its connection."""
        with self._lock:
            self._pending.discard(field)

    def under_way(self) -> set[str]:
        with self._lock:
            return set(self._pending)


def _loads(text: str) -> Any:
    return kombu_json.loads(text)  # type: ignore[no-untyped-call]


def _dumps(value: Any) -> str:
    return str(kombu_json.dumps(value))  # type: ignore[no-untyped-call]


def as_text(value: Any) -> str:
    """A Redis reply (bytes or str) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


_landing: Landing | None = None
_blocking_wait: list[str] = []  # the idle wait's command, chosen once per process from the server's version


def land_messages(key: str, owner: str) -> Landing:
    """Make this process's kombu Redis consumers land every message they take (patches kombu once per process)."""
    global _landing
    _landing = Landing(key, owner)
    channel: Any = kombu_redis.Channel
    if not getattr(channel, _PATCHED, False):
        channel._brpop_start = _patched_start(channel._brpop_start)
        channel._brpop_read = _patched_read(channel._brpop_read)
        channel._poll_error = _patched_poll_error(channel._poll_error)
        channel._on_connection_disconnect = _patched_disconnect(channel._on_connection_disconnect)
        qos: Any = kombu_redis.QoS
        qos.append = _patched_append(qos.append)
        setattr(channel, _PATCHED, True)
    return _landing


def stop_landing() -> None:
    """Consumers made from now on in this process take messages as stock kombu does (the patch stays, inert)."""
    global _landing
    _landing = None


def _patched_start(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def start(self: Any, timeout: float | None = None) -> None:
        landing = _landing
        if landing is None or self.global_keyprefix:
            original(self, timeout)  # not a worker process (or prefixed keys the script would not see)
            return None
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        _forget_unread(self, landing)
        idle = getattr(self, "_blobscore_idle", False)
        command = _wait_command(self.client) if idle else "EVAL"
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        if idle:
            self._blobscore_sent = (command, None)
            self.client.connection.send_command(*_wait_args(command, keys[0], timeout or 0))
        else:
            field = landing.begin()
            self._blobscore_sent = ("EVAL", field)
            self.client.connection.send_command("EVAL", POP_SCRIPT, len(keys) + 1, landing.key, *keys, field)
        return None

    return start


def _patched_read(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def read(self: Any, **options: Any) -> bool:
        sent = self.__dict__.pop("_blobscore_sent", None)
        landing = _landing
        if sent is None or landing is None:
            return bool(original(self, **options))
        command, field = sent
        try:
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                if field is not None:
                    landing.end(field)  # the script may have run: the heartbeat puts the message back
                self.client.connection.disconnect()
                raise
            except Exception:
                if field is not None:
                    landing.end(field)  # an error reply (a script refused): nothing was popped, nothing is under way
                raise
            if field is None:  # the idle wait: something arrived, or the timeout passed; look at every queue
                self._blobscore_idle = False
                raise Empty()
            if not reply:
                landing.end(field)
                self._blobscore_idle = True
                raise Empty()
            self._blobscore_idle = False
            key, item = as_text(reply[0]), as_text(reply[1])
            _deliver(self, landing, field, key, item)
            return True
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    return read


def _deliver(channel: Any, landing: Landing, field: str, key: str, item: str) -> None:
    """Hand the message to kombu; `QoS.append` removes the landing field in its own transaction."""
    dest = key.rsplit(channel.sep, 1)[0]
    channel._queue_cycle.rotate(dest)
    channel._blobscore_landed = field
    try:
        channel.connection._deliver(_loads(item), dest)
    except Exception:
        if channel.__dict__.pop("_blobscore_landed", None) is not None:
            # Not a crash but a message kombu cannot take (stock kombu drops it too): keep it aside, never loop.
            with channel.conn_or_acquire() as client:
                _set_aside(client, landing, field)
        raise
    if channel.__dict__.pop("_blobscore_landed", None) is not None:
        # kombu took it without recording it here (it rejected it back onto its queue itself): only clear the field.
        with channel.conn_or_acquire() as client:
            client.hdel(landing.key, field)
        landing.end(field)


def _patched_append(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def append(self: Any, message: Any, delivery_tag: str) -> None:
        landing = _landing
        field = self.channel.__dict__.pop("_blobscore_landed", None)
        if landing is None or field is None:
            original(self, message, delivery_tag)
            return
        delivery = message.delivery_info
        try:
            with self.pipe_or_acquire() as pipe:
                # kombu's own two writes, plus the landing field's removal, in one MULTI/EXEC.
                pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
                pipe.hset(self.unacked_key, delivery_tag,
                          _dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))
                pipe.hdel(landing.key, field)
                pipe.execute()
        finally:
            landing.end(field)  # done, or failed: then the field (if still there) is the heartbeat's to restore
        super(kombu_redis.QoS, self).append(message, delivery_tag)

    return append


def _patched_poll_error(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def poll_error(self: Any, type: str, **options: Any) -> Any:
        landing = _landing
        if type == "BRPOP" and landing is not None:
            _forget_unread(self, landing)  # kombu reads and drops the reply: a landed message waits for the heartbeat
        return original(self, type, **options)

    return poll_error


def _patched_disconnect(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def on_disconnect(self: Any, connection: Any) -> Any:
        landing = _landing
        if landing is not None and self._in_poll is connection:
            _forget_unread(self, landing)  # its reply died with the connection (a Redis restart)
        return original(self, connection)

    return on_disconnect


def _forget_unread(channel: Any, landing: Landing) -> None:
    """A command whose reply will never be read (a dropped connection, a poll error): its delivery is over."""
    unread = channel.__dict__.pop("_blobscore_sent", None)
    if unread is not None and unread[1] is not None:
        landing.end(unread[1])


def _wait_command(client: Any) -> str:
    if not _blocking_wait:
        version = str(client.info("server").get("redis_version", "0"))
        major, minor = (int(part) for part in [*version.split("."), "0"][:2])
        _blocking_wait.append("BLMOVE" if (major, minor) >= (6, 2) else "BRPOPLPUSH")
    return _blocking_wait[0]


def _wait_args(command: str, key: str, timeout: float) -> list[Any]:
    if command == "BLMOVE":
        return ["BLMOVE", key, key, "RIGHT", "RIGHT", timeout]
    return ["BRPOPLPUSH", key, key, timeout]


def _set_aside(client: Any, landing: Landing, field: str) -> None:
    try:
        def move(pipe: Any) -> None:
            value = pipe.hget(landing.key, field)
            pipe.multi()
            if value is not None:
                pipe.lpush(f"{landing.key}:undeliverable", value)
            pipe.hdel(landing.key, field)

        client.transaction(move, landing.key)
        log.error("a message kombu could not take was set aside on %s:undeliverable", landing.key)
    except Exception as exc:  # Redis gone: the entry stays landed, and the heartbeat puts it back
        log.warning("could not set aside an undeliverable message: %s", exc)
    finally:
        landing.end(field)
