"""Fast reclaim: each worker process holds a short lease in Redis; a dead one's unacknowledged images go back at once.

Celery on Redis only redelivers an unacknowledged message after the visibility timeout (240 s), because nothing
notices a consumer's death. Here every worker process keeps a lease (a key with a TTL, renewed by its heartbeat)
and publishes the delivery tags it holds. When a lease expires, any live worker — or `blobscore beat`, so it also
happens with no worker left — gives the dead one's messages back to their queues through kombu's own restore
(exactly once: kombu's transaction moves a tag out of the unacked hash only if it is still there). A worker that
was merely paused and comes back notices that its lease was taken over and registers again; its late result
writes are still create-only, so nothing is doubled.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import redis

from worker import kombu_landing, landing_sweep

log = logging.getLogger(__name__)

# Renewed every heartbeat (5 s); a worker silent this long is dead (its thread runs even while tasks hold the GIL
# for a while: three missed renewals).
LEASE_TTL_S = 15
# kombu's Redis transport keeps unacknowledged messages in this hash (its `unacked_key`, default name).
UNACKED_KEY = "unacked"
# Only one live process reclaims a given dead worker at a time.
REAPING_TTL_S = 60
# kombu's index of unacknowledged messages by delivery time (its `unacked_index_key`).
UNACKED_INDEX_KEY = "unacked_index"
# A message unacknowledged this long that no live worker says it holds is an orphan (see reclaim_orphans); one
# sweep per deployment at most this often.
ORPHAN_AGE_S = 10.0
ORPHAN_SWEEP_S = 5.0
# The lease is renewed this often, and newly received tags are published at most this long after they arrive (a
# worker killed sooner than that leaves those few to the visibility timeout); a few Redis calls a second at most.
RENEW_S = 5.0
PUBLISH_DELAY_S = 0.5
# A task that finished this long ago and whose message is still unacknowledged lost its ack (the broker restarted
# at that moment): its message is requeued at once instead of waiting out the visibility timeout (the redelivery
# finds the result and only counts it).
LOST_ACK_GRACE_S = 3.0
# A running task's message is unacknowledged by definition, so a heartbeat asks Redis only about the tags of finished
# tasks (acknowledged since, or their acknowledgement lost): ~1 HEXISTS an image instead of one per tag per beat
# (~2 an image at 0.5 s beats). Every tag is asked about at least this often, and at once after a takeover, for
# messages requeued by someone else while their task ran (a lost lease, a broker restart).
FULL_CHECK_S = RENEW_S


def new_worker_id() -> str:
    """Unique per process start: host, pid and randomness (a restarted process never inherits a lease)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Lease:
    """This process's lease and the delivery tags it holds (stamped in memory by the task_received signal)."""

    def __init__(self, key_prefix: str, worker_id: str | None = None, app: Any = None) -> None:
        self.worker_id = worker_id or new_worker_id()
        self._prefix = key_prefix
        self._app = app
        self.landing: kombu_landing.Landing | None = None
        self._tags: set[str] = set()
        self._by_task: dict[str, list[str]] = {}
        self._finished: dict[str, float] = {}
        self._lock = threading.Lock()
        self._registered = False
        self._full_check_at = 0.0
        self._news = threading.Event()
        self._stop = threading.Event()

    def received(self, delivery_tag: str, task_id: str) -> None:
        """A message was reserved by this process (in-memory bookkeeping: no I/O in the consumer thread)."""
        with self._lock:
            self._tags.add(delivery_tag)
            self._by_task.setdefault(task_id, []).append(delivery_tag)
        self._news.set()

    def finished(self, task_id: str) -> None:
        """A task ran to its end: its message should be acknowledged now (the oldest one of that task id: a retry
        publishes a newer message under the same id)."""
        with self._lock:
            tags = self._by_task.get(task_id)
            if not tags:
                return
            self._finished[tags.pop(0)] = time.monotonic()
            if not tags:
                del self._by_task[task_id]

    def keep(self, client: redis.Redis, broker: redis.Redis) -> threading.Thread:
        """Renew the lease every few seconds, and publish new tags within half a second, until `stop`."""
        thread = threading.Thread(target=self._run, args=(client, broker), name="blobscore-lease", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """End the renewing thread (the lease then expires unless released)."""
        self._stop.set()
        self._news.set()

    def _run(self, client: redis.Redis, broker: redis.Redis) -> None:
        while not self._stop.is_set():
            self._news.clear()
            try:
                self.beat(client, broker)
            except Exception as exc:  # Redis restarting: renew on the next round (the TTL leaves three)
                log.warning("lease of worker %s not renewed: %s", self.worker_id, exc)
            self._stop.wait(PUBLISH_DELAY_S)  # at most two publishes a second, however many messages arrive
            self._news.wait(RENEW_S - PUBLISH_DELAY_S)  # new tags are published at once after a quiet spell

    def beat(self, client: redis.Redis, broker: redis.Redis) -> None:
        """Renew the lease and publish the tags still unacknowledged; notice a lease taken over while paused."""
        taken_over = self._registered and not client.sismember(workers_key(self._prefix), self.worker_id)
        now = time.monotonic()
        with self._lock:
            tags = list(self._tags)
            full = taken_over or now - self._full_check_at >= FULL_CHECK_S
            asked = tags if full else [tag for tag in tags if tag in self._finished]
        if full:
            self._full_check_at = now
        pipe = broker.pipeline(transaction=False)
        for tag in asked:
            pipe.hexists(UNACKED_KEY, tag)
        gone = {tag for tag, still in zip(asked, pipe.execute(), strict=True) if not still}
        held = [tag for tag in tags if tag not in gone]
        with self._lock:
            self._tags.difference_update(gone)  # acknowledged since; tags received meanwhile stay
            for tag in gone:
                self._finished.pop(tag, None)
            now = time.monotonic()
            lost = [tag for tag in held if now - self._finished.get(tag, now) > LOST_ACK_GRACE_S]
        if lost and self._app is not None:
            log.warning("worker %s: %d finished tasks lost their acknowledgement (broker restarted?): requeued",
                        self.worker_id, _restore(self._app, broker, lost))
            with self._lock:
                self._tags.difference_update(lost)
                for tag in lost:
                    self._finished.pop(tag, None)
            held = [tag for tag in held if tag not in lost]
        if self.landing is not None and (back := landing_sweep.put_back_stale(broker, self.landing)):
            log.warning("worker %s: %d messages taken while its broker connection dropped were put back on their "
                        "queues", self.worker_id, back)
        if taken_over:
            log.warning("worker %s: its lease expired and was taken over (paused or cut off?): its unacknowledged "
                        "images were requeued; results stay single (create-only writes)", self.worker_id)
        pipe = client.pipeline(transaction=True)
        pipe.set(lease_key(self._prefix, self.worker_id), time.time(), ex=LEASE_TTL_S)
        pipe.sadd(workers_key(self._prefix), self.worker_id)
        pipe.delete(held_key(self._prefix, self.worker_id))
        if held:
            pipe.sadd(held_key(self._prefix, self.worker_id), *held)
        pipe.execute()
        self._registered = True

    def release(self, client: redis.Redis) -> None:
        """A clean shutdown: kombu restores what it reserved; drop the lease so nobody reclaims it again."""
        pipe = client.pipeline(transaction=False)
        pipe.delete(lease_key(self._prefix, self.worker_id), held_key(self._prefix, self.worker_id))
        pipe.srem(workers_key(self._prefix), self.worker_id)
        pipe.execute()


def workers_key(prefix: str) -> str:
    """The set of worker ids that hold (or held) a lease in this deployment."""
    return f"{prefix}workers"


def lease_key(prefix: str, worker_id: str) -> str:
    """A worker's lease: present while it is alive."""
    return f"{prefix}lease:{worker_id}"


def landing_key(prefix: str) -> str:
    """The broker hash where a message stays from the moment it leaves its queue until kombu records it as
    unacknowledged (worker/kombu_landing.py)."""
    return f"{prefix}landing"


def held_key(prefix: str, worker_id: str) -> str:
    """The delivery tags a worker held at its last heartbeat."""
    return f"{prefix}held:{worker_id}"


def dead_workers(client: redis.Redis, prefix: str) -> list[str]:
    """Registered workers whose lease has expired."""
    ids = sorted(str(worker) for worker in client.smembers(workers_key(prefix)))
    if not ids:
        return []
    pipe = client.pipeline(transaction=False)
    for worker in ids:
        pipe.exists(lease_key(prefix, worker))
    return [worker for worker, alive in zip(ids, pipe.execute(), strict=True) if not alive]


def reclaim_dead(app: Any, client: redis.Redis, broker: redis.Redis, prefix: str, me: str) -> int:
    """Give every dead worker's unacknowledged messages back to their queues; the number of messages restored."""
    restored = 0
    for worker in dead_workers(client, prefix):
        if not client.set(f"{prefix}reaping:{worker}", me, nx=True, ex=REAPING_TTL_S):
            continue  # another live process is on it
        tags = [str(tag) for tag in client.smembers(held_key(prefix, worker))]
        restored += _restore(app, broker, tags)
        pipe = client.pipeline(transaction=True)
        pipe.delete(held_key(prefix, worker))
        pipe.srem(workers_key(prefix), worker)
        pipe.execute()
        log.warning("worker %s stopped renewing its lease: %d of its unacknowledged images requeued now",
                    worker, len(tags))
    return restored


def reclaim(app: Any, client: redis.Redis, broker: redis.Redis, prefix: str, queue_prefix: str, me: str) -> int:
    """Requeue what dead workers held: those whose lease expired, and orphans no live worker holds."""
    return reclaim_dead(app, client, broker, prefix, me) + reclaim_orphans(app, client, broker, prefix,
                                                                          queue_prefix, me)


def reclaim_orphans(app: Any, client: redis.Redis, broker: redis.Redis, prefix: str, queue_prefix: str,
                    me: str) -> int:
    """Requeue this deployment's unacknowledged messages that no live worker holds (older than ORPHAN_AGE_S).

    A live worker publishes what it holds within half a second, so such a message belonged to a worker that died
    before it could say so — the gap `reclaim_dead` leaves. One process of the deployment sweeps at a time; only
    messages of its own queues (`queue_prefix`) are looked at: the unacked hash is shared by everything on the
    broker.
    """
    if not client.set(f"{prefix}orphan-sweep", me, nx=True, ex=int(ORPHAN_SWEEP_S)):
        return 0
    landed = landing_sweep.put_back_dead(broker, landing_key(prefix), lambda owners: _alive(client, prefix, owners),
                                         ORPHAN_AGE_S)
    if landed:
        log.warning("%d images a worker had taken off their queue when it died were put back", landed)
    return landed + _reclaim_unacked_orphans(app, client, broker, prefix, queue_prefix)


def _alive(client: redis.Redis, prefix: str, workers: Iterable[str]) -> set[str]:
    ids = sorted(workers)
    pipe = client.pipeline(transaction=False)
    for worker in ids:
        pipe.exists(lease_key(prefix, worker))
    return {worker for worker, alive in zip(ids, pipe.execute(), strict=True) if alive}


def _reclaim_unacked_orphans(app: Any, client: redis.Redis, broker: redis.Redis, prefix: str,
                             queue_prefix: str) -> int:
    old = [str(tag) for tag in broker.zrangebyscore(UNACKED_INDEX_KEY, 0, time.time() - ORPHAN_AGE_S)]
    if not old:
        return 0
    live = [worker for worker in _registered(client, prefix) if client.exists(lease_key(prefix, worker))]
    held: set[str] = set()
    for worker in live:
        held.update(str(tag) for tag in client.smembers(held_key(prefix, worker)))
    candidates = [tag for tag in old if tag not in held]
    orphans = [tag for tag, entry in zip(candidates, broker.hmget(UNACKED_KEY, candidates) if candidates else [],
                                         strict=True) if entry and _is_ours(entry, queue_prefix)]
    restored = _restore(app, broker, orphans)
    if restored:
        log.warning("%d unacknowledged images held by no live worker (one died before it could say so) requeued",
                    restored)
    return restored


def _registered(client: redis.Redis, prefix: str) -> list[str]:
    return [str(worker) for worker in client.smembers(workers_key(prefix))]


def _is_ours(entry: str | bytes, queue_prefix: str) -> bool:
    try:
        routing_key = str(json.loads(entry)[2])
    except (ValueError, IndexError, TypeError):
        return False
    return routing_key.startswith((f"{queue_prefix}.", f"{queue_prefix}:"))


def _restore(app: Any, broker: redis.Redis, tags: list[str]) -> int:
    present = [tag for tag in tags if broker.hexists(UNACKED_KEY, tag)]
    if not present:
        return 0
    with app.connection_for_write() as connection:
        qos = connection.default_channel.qos
        # kombu's own restore: the same queue lookup and `redelivered` flag as a visibility-timeout restore, in a
        # transaction that does nothing if the tag was acknowledged or restored meanwhile; False when it could not
        # (worker/kombu_restore.py: the message stays unacknowledged).
        return sum(qos.restore_by_tag(tag) is not False for tag in present)


class Reclaimer(threading.Thread):
    """For processes with no lease of their own (`blobscore beat`): reclaim dead workers' images every few seconds,
    so that scale-to-zero or the loss of every worker never strands an unacknowledged image."""

    def __init__(self, app: Any, client: redis.Redis, broker: redis.Redis, prefix: str, queue_prefix: str,
                 every_s: float) -> None:
        super().__init__(name="blobscore-reclaimer", daemon=True)
        self._args = (app, client, broker, prefix, queue_prefix, f"reclaimer-{new_worker_id()}")
        self._every_s = every_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                reclaim(*self._args)
            except Exception as exc:  # Redis restarting: try again on the next round
                log.warning("reclaiming dead workers' images failed: %s", exc)
            self._stop_event.wait(self._every_s)

    def stop(self) -> None:
        """End the loop."""
        self._stop_event.set()
