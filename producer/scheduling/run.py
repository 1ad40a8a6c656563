"""One run of a schedule: an incremental enqueue as a job of its own, never queueing an image still in flight."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from celery import Celery

from producer.enqueue import EnqueueOptions, Publish, enqueue
from producer.publishing import TaskPublisher
from producer.scheduling.app import SCHEDULED_RUN_TASK
from producer.scheduling.spec import ScheduleSpec, check_service
from producer.scheduling.store import RunRecord, ScheduleStore
from worker.jobs import JobState, JobStore, UnknownJobError
from worker.settings import Settings
from worker.storage import BlobStore

log = logging.getLogger(__name__)

# An unfinished run older than this no longer keeps its images out of later runs (`blobscore reconcile` it).
STALE_RUN_S = 24 * 3600.0


@dataclass(frozen=True)
class RunReport:
    """What one run did; `busy` when another run of the schedule held its lock (nothing was done)."""

    schedule: str
    job_id: str | None
    listed: int
    skipped_current: int
    excluded_in_flight: int
    busy: bool
    trigger: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able view."""
        return {"schedule": self.schedule, "job_id": self.job_id, "listed": self.listed,
                "skipped_current": self.skipped_current, "excluded_in_flight": self.excluded_in_flight,
                "busy": self.busy, "trigger": self.trigger}


def triage_active(
    states: Mapping[str, JobState | None], started: Mapping[str, float], now: float, stale_after_s: float = STALE_RUN_S
) -> tuple[list[str], list[str]]:
    """Split a schedule's in-flight jobs into (still shielding their images, to forget).

    Called under the schedule's run lock. `done` jobs are finished; a job whose record is gone (None) is forgotten;
    a job still `listing` belongs to a run that died mid-listing (no live run can hold it: we hold the lock), so it
    shields nothing (its queued images, if any, find their result already written and are not scored twice); a
    `running` job older than `stale_after_s` is assumed stuck and no longer shields its images.
    """
    shielding, forget = [], []
    for job_id, state in sorted(states.items()):
        if state == "running" and now - started.get(job_id, now) < stale_after_s:
            shielding.append(job_id)
        else:
            forget.append(job_id)
    return shielding, forget


def unfinished_images(listed: set[str], ok: set[str], rejected: set[str]) -> set[str]:
    """A job's images still queued or retrying: listed, with no outcome yet."""
    return listed - ok - rejected


def images_in_flight(jobs: JobStore, schedules: ScheduleStore, name: str, now: float) -> set[str]:
    """The images earlier runs of the schedule queued that have no outcome yet; finished jobs are forgotten."""
    started = schedules.active_jobs(name)
    states: dict[str, JobState | None] = {}
    for job_id in started:
        try:
            states[job_id] = jobs.status(job_id).state
        except UnknownJobError:
            states[job_id] = None
    shielding, forget = triage_active(states, started, now)
    schedules.drop_active(name, forget)
    pending: set[str] = set()
    for job_id in shielding:
        pending |= unfinished_images(set(jobs.members(job_id, "listed")), set(jobs.members(job_id, "ok")),
                                     set(jobs.members(job_id, "rejected")))
    return pending


def run_schedule(
    spec: ScheduleSpec,
    settings: Settings,
    store: BlobStore,
    jobs: JobStore,
    schedules: ScheduleStore,
    publish: Publish,
    trigger: str = "beat",
    clock: Callable[[], float] = time.time,
) -> RunReport:
    """Run the schedule once under its lock: queue its new and changed images as a new job and record it.

    The run lists the schedule's container/prefix and queues only the images with no current result (new blobs, or
    blobs whose etag changed), from one listing of the results prefix (`producer.enqueue`); its job (visible with
    `blobscore status`) becomes the schedule's last job. Images earlier runs queued that have no outcome yet are
    excluded, so a run that starts while earlier ones are still going never queues the same image twice; the
    schedule's Redis lock keeps two runs (two beats, beat and `schedule run`) from listing at the same time.
    """
    check_service(spec, settings)
    with schedules.run_lock(spec.name) as held:
        if not held:
            log.info("schedule %s: another run holds its lock; this one does nothing", spec.name)
            return RunReport(spec.name, None, 0, 0, 0, busy=True, trigger=trigger)
        started = clock()
        in_flight = images_in_flight(jobs, schedules, spec.name, started)
        options = EnqueueOptions(exclude=in_flight, window=settings.enqueue_window)
        report = enqueue(store, jobs, publish, spec.job_spec(settings), settings.deployment, options)
        run = RunRecord(report.job_id, started, clock(), report.listed, report.skipped_current, len(in_flight),
                        trigger)
        schedules.record_run(spec.name, run)
    log.info("schedule %s: job %s queued %d images (%d current, %d still in flight from earlier runs)",
             spec.name, report.job_id, report.listed, report.skipped_current, len(in_flight))
    return RunReport(spec.name, report.job_id, report.listed, report.skipped_current, len(in_flight),
                     busy=False, trigger=trigger)


class RunResources:
    """The Blob client, job store and schedule store of a process, opened on first use and shared by threads."""

    def __init__(self, settings: Settings, app: Celery) -> None:
        """Nothing is opened yet."""
        self._settings = settings
        self._app = app
        self._lock = threading.Lock()
        self._opened: tuple[BlobStore, JobStore, ScheduleStore] | None = None

    def get(self) -> tuple[BlobStore, JobStore, ScheduleStore]:
        """The shared adapters."""
        with self._lock:
            if self._opened is None:
                self._opened = (BlobStore.from_settings(self._settings), JobStore.from_settings(self._settings),
                                ScheduleStore.from_settings(self._settings, self._app))
            return self._opened

    def publisher(self, service: str) -> TaskPublisher:
        """Publishes image tasks to the service's queue."""
        return TaskPublisher(self._app, self._settings.queue_for(service))

    def close(self) -> None:
        """Close whatever was opened."""
        with self._lock:
            if self._opened is not None:
                store, jobs, schedules = self._opened
                store.close()
                jobs.close()
                schedules.close()
                self._opened = None


def run_now(spec: ScheduleSpec, settings: Settings, resources: RunResources, trigger: str) -> RunReport:
    """Run the schedule in this process with shared adapters."""
    store, jobs, schedules = resources.get()
    return run_schedule(spec, settings, store, jobs, schedules, resources.publisher(spec.service), trigger)


def register_scheduled_run(app: Celery, settings: Settings) -> RunResources:
    """Register `blobscore.scheduled_run` on `app`; its one argument is the schedule's spec as a dict."""
    resources = RunResources(settings, app)

    @app.task(name=SCHEDULED_RUN_TASK, ignore_result=True, acks_late=False)  # type: ignore[untyped-decorator]
    def scheduled_run(spec_args: dict[str, Any]) -> dict[str, Any]:
        spec = ScheduleSpec.model_validate(spec_args)
        _, _, schedules = resources.get()
        if not schedules.exists(spec.name):
            log.info("schedule %s was removed; its queued run does nothing", spec.name)
            return {"schedule": spec.name, "removed": True}
        return run_now(spec, settings, resources, "beat").to_dict()

    return resources
