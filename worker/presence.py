"""Worker presence in Redis: which queues a live worker consumes, and when it last took a task from each.

`blobscore status` reads it to say "no worker is consuming queue Q" instead of waiting in silence. A task costs no
Redis call for this: it only stamps a time in memory, and one background thread per process publishes the stamps
every few seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
# A worker not heard of for this long is gone (three missed heartbeats).
STALE_S = 3 * HEARTBEAT_S


def seen_key(key_prefix: str, queue: str) -> str:
    """When a live worker consuming `queue` last said so."""
    return f"{key_prefix}queue:{queue}:worker_seen"


def taken_key(key_prefix: str, queue: str) -> str:
    """When a worker last took a task from `queue`."""
    return f"{key_prefix}queue:{queue}:task_taken"


class Presence:
    """Stamps taken tasks in memory; a daemon thread publishes them with the worker's heartbeat."""

    def __init__(self, key_prefix: str, queues: list[str]) -> None:
        self._prefix = key_prefix
        self._queues = list(queues)
        self._taken: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def took(self, queue: str) -> None:
        """A task of `queue` started (one dict store: no lock, no I/O)."""
        self._taken[queue] = time.time()

    def start(self, client: redis.Redis, also: Sequence[Callable[[], object]] = ()) -> None:
        """Publish the heartbeat every few seconds until `stop`, running `also` (lease, reclaim) on each beat."""
        if self._thread is not None or not self._queues:
            return
        self._thread = threading.Thread(target=self._run, args=(client, tuple(also)), name="blobscore-heartbeat",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the heartbeat thread."""
        self._stop.set()

    def _run(self, client: redis.Redis, also: tuple[Callable[[], object], ...]) -> None:
        while not self._stop.is_set():
            self.beat(client)
            for step in also:
                try:
                    step()
                except Exception as exc:  # a beat that fails (Redis restarting) is tried again on the next one
                    log.warning("heartbeat step failed: %s", exc)
            self._stop.wait(HEARTBEAT_S)

    def beat(self, client: redis.Redis) -> None:
        """Publish once: every consumed queue is seen now; the latest taken-task stamps."""
        now = time.time()
        try:
            pipe = client.pipeline(transaction=False)
            for queue in self._queues:
                pipe.set(seen_key(self._prefix, queue), now)
            for queue, taken in list(self._taken.items()):
                pipe.set(taken_key(self._prefix, queue), taken)
            pipe.execute()
        except redis.RedisError as exc:
            log.debug("presence heartbeat not published: %s", exc)  # the next beat tries again


@dataclass(frozen=True)
class QueuePresence:
    """What status says about a queue: seconds since a live worker was seen, and since a task was taken."""

    queue: str
    worker_seen_s: float | None
    task_taken_s: float | None

    @property
    def consumed(self) -> bool:
        """True while some worker consuming the queue is alive."""
        return self.worker_seen_s is not None and self.worker_seen_s <= STALE_S


def queue_presence(client: redis.Redis, key_prefix: str, queue: str, now: float | None = None) -> QueuePresence:
    """Read a queue's presence stamps."""
    now = time.time() if now is None else now
    seen, taken = client.mget([seen_key(key_prefix, queue), taken_key(key_prefix, queue)])
    return QueuePresence(
        queue,
        None if seen is None else max(now - float(seen), 0.0),
        None if taken is None else max(now - float(taken), 0.0),
    )


def describe_stall(presence: QueuePresence, pending: int) -> str | None:
    """One line saying why nothing moves, or None when a worker is consuming (pure)."""
    if pending <= 0:
        return None
    if presence.worker_seen_s is None:
        return f"no worker has ever consumed queue {presence.queue}: start one (`blobscore worker`)"
    if not presence.consumed:
        return (f"no worker is consuming queue {presence.queue} (last seen {presence.worker_seen_s:.0f} s ago): "
                "start one (`blobscore worker`)")
    return None
