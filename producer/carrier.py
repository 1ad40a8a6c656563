"""The listing carrier: a job's listing done one page per task by the fleet (workers, beat), crash-safe and flat.

`blobscore enqueue` only creates the job and queues its first listing step, so it returns at once. Each step, on
the deployment's listing queue, lists one page from the saved continuation, keeps the images that lack a current
result (merged with the results listing, never all results at once), records the page, publishes its image
tasks and saves the continuation — then queues the next step, or waits while the job's window is full.

A step killed midway is redelivered (acks late, leases) and redoes its page: the page is recorded at the same
indices and its tasks published again find their results, so nothing is lost or doubled. Several messages of one
step (a redelivery racing a retry) are collapsed by a generation number: only the message whose generation is
current acts, and moving it on is a compare-and-set. A step sends its successor before it moves the generation on,
so the successor — which another thread may take within a millisecond — counts as current one generation ahead.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task

from producer.enqueue import page_results, task_for, wanted_on_page
from producer.listing import ResultsCursor
from producer.publishing import TaskPublisher
from worker.contracts import ImageTask
from worker.jobs import JobStore, UnknownJobError
from worker.redis_client import open_redis
from worker.results import ExistingResult
from worker.settings import Settings
from worker.storage import BlobStore

log = logging.getLogger(__name__)

LIST_STEP_TASK = "blobscore.list_step"
# A full window is looked at again after this long (the workers drain it meanwhile).
WINDOW_POLL_S = 2.0
# One step at a time per job. A step takes a second or two (one page); one that died holding the lock is taken up
# again after this long at most. Should a slow step outlive it, two steps may list the same page: its tasks are
# published twice and find their results (idempotent), the page is recorded at the same indices.
STEP_LOCK_S = 20
DEFAULT_PAGE_SIZE = 5000


def listing_queue(settings: Settings) -> str:
    """The deployment's queue of listing steps: consumed by every worker and by `blobscore beat`."""
    return f"{settings.queue}.{settings.namespace_in_use}:listing"


def pack_cursor(cursor: ResultsCursor) -> str:
    """The results cursor as stored in the job record (zlib-packed JSON, base64)."""
    body = {"c": cursor.continuation, "x": cursor.exhausted, "l": cursor.last_read,
            "a": {name: [r.source_etag, r.status, r.code, r.job_id] for name, r in cursor.ahead.items()}}
    return base64.b64encode(zlib.compress(json.dumps(body).encode("utf-8"), 6)).decode("ascii")


def unpack_cursor(packed: str) -> ResultsCursor:
    """A stored results cursor (the start of the results listing when none is stored)."""
    if not packed:
        return ResultsCursor()
    body = json.loads(zlib.decompress(base64.b64decode(packed)))
    ahead = {name: ExistingResult(source_etag=etag, status=status, code=code, job_id=job)
             for name, (etag, status, code, job) in body["a"].items()}
    return ResultsCursor(body["c"], ahead, bool(body["x"]), body.get("l"))


@dataclass(frozen=True)
class CarrierDeps:
    """What a listing step needs: the stores, publishing image tasks and the next step."""

    store: BlobStore
    jobs: JobStore
    publish_images: Callable[[str, list[ImageTask]], None]
    next_step: Callable[[str, int, float], None]


@dataclass(frozen=True)
class StepOutcome:
    """What one step did (for logs and tests)."""

    action: str  # "stale", "busy", "waiting", "listed", "done"
    queued: int = 0


def list_step(job_id: str, generation: int, deps: CarrierDeps) -> StepOutcome:
    """Carry the job's listing one page further (see the module docstring)."""
    try:
        record = deps.jobs.fields(job_id)
    except UnknownJobError:
        log.error("listing step of unknown job %s dropped (another deployment's, or deleted)", job_id)
        return StepOutcome("stale")
    if record.get("listing_done") == "1":
        return StepOutcome("done")
    if generation < int(record.get("listing_gen", 0)):
        return StepOutcome("stale")
    lock = StepLock(deps.jobs, job_id)
    if not lock.take():
        deps.next_step(job_id, generation, STEP_LOCK_S / 4)  # the holder may have died: look again soon
        return StepOutcome("busy")
    try:
        # Read again under the lock: the step before may have moved on since the first read.
        record = deps.jobs.fields(job_id)
        if not _is_current(job_id, generation, record, deps):
            return StepOutcome("stale")
        if record.get("listing_done") == "1":
            return StepOutcome("done")
        return _step(job_id, generation, record, deps, lock)
    finally:
        lock.release()


def _is_current(job_id: str, generation: int, record: dict[str, str], deps: CarrierDeps) -> bool:
    current = int(record.get("listing_gen", 0))
    if generation == current + 1:
        # The step that sent this message moves the generation on right after sending it (see _move_on): it may
        # not have yet — this message can be taken within a millisecond by another thread — or it died in
        # between. Either way its page is saved, and this message is the chain's next step: do the move for it.
        return deps.jobs.bump_listing_generation(job_id, current) or _generation(job_id, deps) == generation
    return generation == current


def _generation(job_id: str, deps: CarrierDeps) -> int:
    return int(deps.jobs.fields(job_id).get("listing_gen", 0))


def _step(job_id: str, generation: int, record: dict[str, str], deps: CarrierDeps, lock: StepLock) -> StepOutcome:
    spec, origin, progress = deps.jobs.spec(job_id), deps.jobs.origin(job_id), deps.jobs.progress(job_id)
    window, page_size = int(record.get("window", 40_000)), int(record.get("page_size", DEFAULT_PAGE_SIZE))
    limit = int(record["limit"]) if record.get("limit") else None
    if progress.next_index - deps.jobs.finished_count(job_id) + page_size > max(window, page_size):
        _move_on(job_id, generation, deps, lock, WINDOW_POLL_S)
        return StepOutcome("waiting")
    page = next(iter(deps.store.list_pages(spec.container, spec.prefix, progress.continuation, page_size)), None)
    cursor = unpack_cursor(record.get("results_cursor", ""))
    queued, skipped = 0, int(record.get("skipped_current", 0))
    index, page_no = progress.next_index, progress.next_page
    if page is not None:
        results, cursor = page_results(deps.store, spec, page, cursor)
        excluded = deps.jobs.excluded(job_id, [blob.name for blob in page.blobs])
        wanted, page_skipped = wanted_on_page(page, spec, results, excluded)
        wanted = wanted[: None if limit is None else max(limit - index, 0)]
        skipped += page_skipped
        if wanted:
            deps.jobs.record_page(job_id, page_no, index, [blob.name for blob in wanted])
            deps.publish_images(spec.service, [task_for(job_id, index + offset, spec, blob, origin)
                                               for offset, blob in enumerate(wanted)])
            index, page_no, queued = index + len(wanted), page_no + 1, len(wanted)
    continuation = page.continuation if page is not None else None
    deps.jobs.advance(job_id, continuation, index, page_no,
                      {"results_cursor": pack_cursor(cursor), "skipped_current": skipped})
    if continuation is None or (limit is not None and index >= limit):
        deps.jobs.finish_listing(job_id)
        return StepOutcome("done", queued)
    _move_on(job_id, generation, deps, lock, 0.0)
    return StepOutcome("listed", queued)


def _move_on(job_id: str, generation: int, deps: CarrierDeps, lock: StepLock, countdown: float) -> None:
    # The page is saved: let the next step in before it exists (it may start at once, on another thread). Then the
    # next message, then the compare-and-set: a crash in between leaves a message one generation ahead, which
    # _is_current accepts; the other order could leave none, and the listing would stop.
    lock.release()
    deps.next_step(job_id, generation + 1, countdown)
    deps.jobs.bump_listing_generation(job_id, generation)


class StepLock:
    """One listing step of a job at a time. A step that died holding it is taken up again after STEP_LOCK_S at
    most; a release only ever drops the releaser's own hold (see STEP_LOCK_S for a step that outlives it)."""

    def __init__(self, jobs: JobStore, job_id: str) -> None:
        self._jobs, self._job_id, self._token = jobs, job_id, uuid.uuid4().hex

    def take(self) -> bool:
        """Hold the lock; False while another step holds it."""
        return self._jobs.take_step_lock(self._job_id, self._token, STEP_LOCK_S)

    def release(self) -> None:
        """Let the next step in (idempotent)."""
        self._jobs.release_step_lock(self._job_id, self._token)


def start_listing(app: Celery, settings: Settings, jobs: JobStore, job_id: str) -> None:
    """Queue the job's next listing step (a new job's first, or a resume after the chain was lost)."""
    generation = int(jobs.fields(job_id).get("listing_gen", 0))
    jobs.bump_listing_generation(job_id, generation)  # any older chain still queued becomes stale
    send_step(app, settings, job_id, generation + 1, 0.0)


def send_step(app: Celery, settings: Settings, job_id: str, generation: int, countdown: float) -> None:
    """Publish one listing step message."""
    app.send_task(LIST_STEP_TASK, args=[job_id, generation], queue=listing_queue(settings), countdown=countdown or None,
                  serializer="json", ignore_result=True, argsrepr=f"[{job_id}:{generation}]", kwargsrepr="{}")


def register_carrier(app: Celery, settings: Settings) -> None:
    """Register the listing step on a worker's (or beat's) Celery app; its adapters open on first use."""
    opened: dict[str, Any] = {}

    def deps() -> CarrierDeps:
        if not opened:
            jobs = JobStore(open_redis(settings.jobs_url), settings.key_prefix)
            publishers: dict[str, TaskPublisher] = {}

            def publish(service: str, tasks: list[ImageTask]) -> None:
                publisher = publishers.setdefault(service, TaskPublisher(app, settings.queue_for(service)))
                publisher(tasks)

            opened["deps"] = CarrierDeps(BlobStore.from_settings(settings), jobs, publish,
                                         lambda job, gen, countdown: send_step(app, settings, job, gen, countdown))
        deps_: CarrierDeps = opened["deps"]
        return deps_

    @app.task(name=LIST_STEP_TASK, bind=True, max_retries=None, acks_late=True)  # type: ignore[untyped-decorator]
    def list_step_task(self: Task, job_id: str, generation: int) -> str:
        try:
            outcome = list_step(job_id, generation, deps())
        except Exception as exc:
            # Blob or Redis unreachable: the same step again a little later (it redoes its page from the saved
            # continuation); never lose the chain.
            log.warning("listing step of job %s failed, retrying: %s", job_id, exc)
            raise self.retry(exc=exc, countdown=5) from exc
        log.log(logging.INFO if outcome.action in ("listed", "done") else logging.DEBUG,
                "job %s: listing step %d %s, %d images queued", job_id, generation, outcome.action, outcome.queued)
        return outcome.action
