"""`blobscore beat`: redbeat's scheduler, locked so one beat fires, beside the worker that executes the runs."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery
from celery.beat import Service
from celery.signals import beat_init, worker_ready, worker_shutdown, worker_shutting_down
from redbeat.schedulers import LUA_EXTEND_TO_SCRIPT, RedBeatScheduler, acquire_distributed_beat_lock, get_redis

from producer.carrier import listing_queue, register_carrier
from producer.scheduling.app import BEAT_MAX_LOOP_INTERVAL_S, BeatEntry, schedules_app, schedules_queue
from producer.scheduling.run import register_scheduled_run
from producer.scheduling.spec import ScheduleSpec, check_service
from producer.scheduling.store import ScheduleStore, SyncReport
from worker.leases import Reclaimer
from worker.presence import HEARTBEAT_S
from worker.redis_client import open_redis
from worker.settings import Settings

log = logging.getLogger(__name__)
# How long a stopping beat waits for its loop to end and release the lock.
STOP_WAIT_S = 5.0


class LockedRedBeatScheduler(RedBeatScheduler):  # type: ignore[misc]
    """redbeat's scheduler taking its lock in the loop (never blocking) and riding out Redis outages.

    redbeat takes the lock in its `beat_init` handler, which blocks until it gets it, so a standby beat could never be
    stopped cleanly: here the loop tries it without blocking. A tick that cannot reach Redis waits for the next loop,
    and a lock lost meanwhile (expired, taken by another beat) sends this beat back to standby instead of ending its
    loop.
    """

    # Entries scored by when they are really due (redbeat's own due_at drifts earlier; see next_run_at).
    Entry = BeatEntry
    lock: Any = None

    def tick(self, min: Any = min, **kwargs: Any) -> float:
        try:
            if self.lock is None and not self._acquire_lock():
                return float(self.max_interval)  # standby: another beat holds the lock
            return float(super().tick(min=min, **kwargs))
        except redis.exceptions.LockError:
            log.warning("beat: lost the schedule lock (expired or taken over); standing by")
            self.lock = None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("beat: Redis unreachable (%s); trying again in %.0f s", exc, self.max_interval)
        return float(self.max_interval)

    def _acquire_lock(self) -> bool:
        client = get_redis(self.app)
        lock = client.lock(self.lock_key, timeout=self.lock_timeout, sleep=self.max_interval, thread_local=False)
        # redbeat's extend script: extend *to* the timeout rather than by it.
        lock.lua_extend = client.register_script(LUA_EXTEND_TO_SCRIPT)
        if not lock.acquire(blocking=False):
            return False
        log.info("beat: Acquired lock")
        self.lock = lock
        return True

    def close(self) -> None:
        try:
            super().close()
        except redis.RedisError as exc:
            log.warning("beat: could not release the lock (%s); it expires by itself", exc)


class BeatThread(threading.Thread):
    """celery.beat.Service in a daemon thread of the worker process."""

    def __init__(self, app: Celery) -> None:
        """Not started yet."""
        super().__init__(name="beat", daemon=True)
        self.app = app
        self.service = Service(app, max_interval=BEAT_MAX_LOOP_INTERVAL_S, scheduler_cls=LockedRedBeatScheduler,
                               remote_control=False)

    def run(self) -> None:
        """The beat loop, until `stop`."""
        self.app.set_current()
        # Building the scheduler reads Redis: wait for it rather than let the thread die while the worker lives.
        while True:
            try:
                self.service.scheduler  # noqa: B018 (a cached property: builds the scheduler)
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("beat: Redis unreachable at start (%s); trying again", exc)
                if self.service._is_shutdown.wait(BEAT_MAX_LOOP_INTERVAL_S):
                    return
        self.service.start()

    def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """End the loop; the scheduler releases the lock as it closes."""
        self.service.stop()
        if self.is_alive():
            self.join(timeout=wait_s)


def sync_config_schedules(store: ScheduleStore, specs: Mapping[str, ScheduleSpec], settings: Settings) -> SyncReport:
    """Check every config-file schedule's service, then write them into Redis."""
    for spec in specs.values():
        check_service(spec, settings)
    report = store.sync_config(specs)
    for verb, names in (("added", report.added), ("updated", report.updated), ("removed", report.removed)):
        if names:
            log.info("config schedules %s: %s", verb, ", ".join(names))
    return report


def beat_worker_argv(settings: Settings, concurrency: int) -> list[str]:
    """Celery worker arguments for the process that executes scheduled runs."""
    return [
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency}",
        f"--queues={schedules_queue(settings)},{listing_queue(settings)}",
        f"--hostname=beat-{os.getpid()}@%h",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def run_beat(settings: Settings, config_schedules: Mapping[str, ScheduleSpec] | None = None,
             concurrency: int = 2) -> None:
    """Sync the config file's schedules, then fire schedules and execute runs in this process until stopped.

    One process: a Celery worker (thread pool) consuming the schedules queue runs `blobscore.scheduled_run`, and a
    beat thread (celery.beat.Service with `LockedRedBeatScheduler`) fires the schedules kept in Redis. Start as many
    as you like: redbeat's lock in Redis lets one of them fire, the others stand by (checking the lock every loop)
    and take over within `BEAT_LOCK_TIMEOUT_S` of the holder dying, at once when it stops cleanly (it releases the
    lock). Every one of them executes runs; a run is serialized per schedule by its own lock anyway.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)
    app = schedules_app(settings)
    store = ScheduleStore.from_settings(settings, app)
    try:
        sync_config_schedules(store, config_schedules or {}, settings)
    finally:
        store.close()
    resources = register_scheduled_run(app, settings)
    register_carrier(app, settings)  # beat always runs: listings go on when every worker is scaled away
    # The lock is taken in the beat loop (LockedRedBeatScheduler), never by redbeat's blocking handler.
    beat_init.disconnect(acquire_distributed_beat_lock)
    beat = BeatThread(app)
    # Beat always runs (two replicas), so it also gives dead workers' images back: with every worker gone (scaled to
    # zero, a lost node) nothing waits for the visibility timeout.
    reclaimer = Reclaimer(app, open_redis(settings.jobs_url), open_redis(settings.broker_url), settings.key_prefix,
                          settings.queue_prefix, HEARTBEAT_S)

    def start_beat(**_: Any) -> None:
        if not beat.is_alive():
            beat.start()
        if not reclaimer.is_alive():
            reclaimer.start()

    def stop_beat(**_: Any) -> None:
        beat.service.stop()

    def finish(**_: Any) -> None:
        reclaimer.stop()
        beat.stop()
        resources.close()

    # Beat fires only once this process consumes the schedules queue; kept connected for the process's life.
    worker_ready.connect(start_beat, weak=False)
    worker_shutting_down.connect(stop_beat, weak=False)
    worker_shutdown.connect(finish, weak=False)
    app.worker_main(beat_worker_argv(settings, concurrency))
