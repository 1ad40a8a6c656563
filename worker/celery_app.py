"""The Celery app, configured from Settings; each reliability setting says why it is there."""

from __future__ import annotations

import contextlib
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_received, worker_process_shutdown, worker_ready, worker_shutdown

from worker.kombu_clients import reuse_clients
from worker.kombu_landing import land_messages
from worker.kombu_restore import keep_unrestorable_messages
from worker.leases import Lease, landing_key, reclaim
from worker.presence import Presence
from worker.redis_client import open_redis
from worker.runtime import ProcessResources
from worker.settings import Settings
from worker.tasks import register_tasks


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for an at-least-once, JSON-only, crash-safe image queue."""
    return {
        "broker_url": settings.broker_url,
        # No result backend: results live in Blob Storage, progress in the job record.
        "result_backend": None,
        "task_ignore_result": True,
        # JSON only: a pickled message injected into the queue is refused, never executed.
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.queue_for(settings.service),
        # Ack after the task ran, and requeue when the worker process dies mid-task: nothing is lost on a crash.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One message reserved per thread: a crashed worker strands as few images as possible.
        "worker_prefetch_multiplier": 1,
        # Unacked messages come back after this long: longer than any task run (every call has a deadline) plus
        # the longest retry countdown (capped below it), short enough that a killed worker's images return soon.
        # kombu only looks for expired unacked messages every `unacked_restore_interval` s, and only scans on every
        # `unacked_restore_throttle`-th look (defaults 10 and 10: 100 s), which would add up to 100 s to every
        # recovery; sweep every few seconds instead, each look a real scan (one small ZRANGE per process).
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 30)),
            "unacked_restore_throttle": 1,
        },
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # On a lost broker connection running images finish; their unacknowledged messages come back and find
        # the results already written (cancelling threads mid-call would gain nothing).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # A hung task is interrupted rather than holding its message forever. Celery enforces these in the
        # prefork pool; in the thread pool the per-call deadlines (gRPC, Blob, Redis) bound each task instead.
        "task_soft_time_limit": settings.task_time_limit_s - 10,
        "task_time_limit": settings.task_time_limit_s,
        # Failures are handled inside the task (retry or an error record); these only matter for a bug.
        "task_acks_on_failure_or_timeout": True,
        # TERM is a warm shutdown: no new messages, running images finish (each call has a deadline), reserved
        # ones go back to the queue. This timeout only bounds a cold shutdown (QUIT, or a second TERM); the
        # thread pool cannot cancel running threads, so their messages return after the visibility timeout.
        "worker_soft_shutdown_timeout": settings.soft_shutdown_timeout_s,
        "worker_enable_soft_shutdown_on_idle": True,
        "worker_hijack_root_logger": False,
        # Remote control (a pub/sub subscription per worker) stays on: it is how the consumer notices a Redis
        # restart (see the setting).
        "worker_enable_remote_control": settings.worker_remote_control,
        # Task events (what Flower shows per task) cost about 1 ms of worker CPU per image (bench/README.md): opt-in.
        "worker_send_task_events": settings.worker_task_events,
        # Remote control and task events of this deployment only (Celery's defaults, "celery" and "celeryev", are
        # shared by everything on the Redis): another deployment's Flower or `celery control` must not reach these
        # workers — shut them down, resize or revoke — nor see their events.
        "control_exchange": f"{settings.queue}.{settings.namespace_in_use}",
        "event_exchange": f"{settings.queue}.{settings.namespace_in_use}.events",
        "task_send_sent_event": False,
    }


def publisher_app(settings: Settings) -> Celery:
    """A Celery app that only publishes (the producer, the CLI): the broker settings, no task, no worker resources."""
    reuse_clients()  # kombu would build a new Redis client for every published task (worker/kombu_clients.py)
    app = Celery("blobscore")
    app.conf.update(celery_config(settings))
    return app


def create_app(settings: Settings, consumes: list[str] | None = None) -> Celery:
    """A Celery app with the image task registered; per-process adapters open on first use.

    A worker passes the queues it `consumes`: once it is ready it publishes its presence (worker/presence.py).
    """
    keep_unrestorable_messages()  # kombu would delete a message it fails to restore (worker/kombu_restore.py)
    reuse_clients()  # and build a new Redis client for every delivery record and ack (worker/kombu_clients.py)
    app = Celery("blobscore")
    app.conf.update(celery_config(settings))
    resources = ProcessResources(settings)
    presence = Presence(settings.key_prefix, consumes or [])
    lease = Lease(settings.key_prefix, app=app)
    if consumes:
        # A message taken off its queue stays in Redis until kombu records it (worker/kombu_landing.py).
        lease.landing = land_messages(landing_key(settings.key_prefix), lease.worker_id)
    register_tasks(app, settings, resources, presence)

    def _received(request: Any = None, **_: Any) -> None:
        lease.received(str(request.message.delivery_tag), str(request.id))

    def _finished(task_id: str | None = None, **_: Any) -> None:
        if task_id is not None:
            lease.finished(task_id)

    def _start(**_: Any) -> None:
        client, broker = resources.get().redis, open_redis(settings.broker_url)
        lease.keep(client, broker)
        presence.start(client, also=(lambda: reclaim(app, client, broker, settings.key_prefix, settings.queue_prefix,
                                                     lease.worker_id),))

    def _close(**_: Any) -> None:
        presence.stop()
        lease.stop()
        if consumes:
            with contextlib.suppress(Exception):  # Redis down at shutdown: the lease simply expires
                lease.release(resources.get().redis)
        resources.close()

    # Weak references would let the closures be collected; keep them connected for the app's life.
    task_received.connect(_received, weak=False)
    task_postrun.connect(_finished, weak=False)
    worker_ready.connect(_start, weak=False)
    worker_process_shutdown.connect(_close, weak=False)
    worker_shutdown.connect(_close, weak=False)
    return app
