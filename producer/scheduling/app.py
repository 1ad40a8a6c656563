"""The Celery app of scheduled runs: its redbeat configuration, its queue, and entries scored by `next_run_at`."""

from __future__ import annotations

from datetime import datetime

from celery import Celery
from redbeat.schedulers import RedBeatSchedulerEntry

from producer.scheduling.spec import next_run_at
from worker.celery_app import celery_config
from worker.settings import Settings

SCHEDULED_RUN_TASK = "blobscore.scheduled_run"
# How often beat looks at the schedule (seconds): new and changed schedules are seen this quickly, and a
# standby beat checks the lock this often.
BEAT_MAX_LOOP_INTERVAL_S = 1.0
# The beat lock expires this long after its holder stopped renewing it (a killed beat): then a standby beat takes
# over. The holder renews it on every loop, so this only has to exceed a loop plus a Redis hiccup.
BEAT_LOCK_TIMEOUT_S = 10


def schedules_queue(settings: Settings) -> str:
    """The queue `blobscore beat` consumes scheduled runs from (never a service's image queue)."""
    return f"{settings.queue}.{settings.namespace_in_use}:schedules"


def namespace(settings: Settings) -> str:
    """The Redis key prefix of this deployment's schedules (two deployments sharing a Redis never meet)."""
    return settings.key_prefix


def schedules_app(settings: Settings) -> Celery:
    """A Celery app for scheduled runs: the image queue's settings plus redbeat's, runs on their own queue."""
    app = Celery("blobscore-schedules")
    app.conf.update(celery_config(settings))
    app.conf.update({
        "task_default_queue": schedules_queue(settings),
        # A scheduled run lists and publishes: no deadline of its own, and a redelivery after a crash is not
        # needed (the next tick runs it again), so it is acked when it starts.
        "task_soft_time_limit": None,
        "task_time_limit": None,
        "task_acks_late": False,
        # No result backend, and no default `celery.backend_cleanup` entry in the schedule.
        "result_expires": None,
        "timezone": "UTC",
        "enable_utc": True,
        "beat_max_loop_interval": BEAT_MAX_LOOP_INTERVAL_S,
        "redbeat_redis_url": settings.jobs_url,
        "redbeat_redis_options": {"socket_timeout": 10, "socket_connect_timeout": 5, "health_check_interval": 30},
        "redbeat_key_prefix": f"{namespace(settings)}redbeat:",
        "redbeat_lock_timeout": BEAT_LOCK_TIMEOUT_S,
    })
    return app


def runs_queue(app: Celery) -> str:
    """The queue scheduled runs go to, as `schedules_app` configured it."""
    return str(app.conf.task_default_queue)


class BeatEntry(RedBeatSchedulerEntry):  # type: ignore[misc]
    """redbeat's entry due at `next_run_at`: its score in redbeat's zset does not drift earlier."""

    @property
    def due_at(self) -> datetime | None:
        """When the entry is next due (now if it never ran)."""
        return next_run_at(self.schedule, self.last_run_at, self._default_now())
