"""Reconcile a job: compare its listing with its results and re-queue every image that has neither."""

from __future__ import annotations

from dataclasses import dataclass

from producer.enqueue import Publish, task_for
from producer.listing import current_results
from worker.jobs import JobStore
from worker.results import is_current
from worker.storage import BlobStore, ListedBlob


@dataclass(frozen=True)
class ReconcileReport:
    """What a reconciliation found and did."""

    job_id: str
    listed: int
    finished: int
    counted_from_results: int
    requeued: int
    source_missing: int


def reconcile(
    store: BlobStore, jobs: JobStore, publish: Publish | None, job_id: str
) -> ReconcileReport:
    """Count results the job missed (a crash after the upload) and re-queue images with no result at all.

    Re-queued images that were in fact still queued are scored once all the same: the worker finds the result
    the first delivery wrote. Without `publish` nothing is changed (a dry run).
    """
    spec = jobs.spec(job_id)
    listed = set(jobs.members(job_id, "listed"))
    finished = set(jobs.members(job_id, "ok")) | set(jobs.members(job_id, "rejected"))
    unfinished = listed - finished
    results = current_results(store.list_metadata(spec.results_container, spec.results_prefix), spec.results_prefix)
    sources = {blob.name: blob for blob in store.list_blobs(spec.container, spec.prefix) if blob.name in unfinished}
    counted, requeue, missing = 0, [], 0
    for name in sorted(unfinished):
        blob = sources.get(name)
        existing = results.get(name)
        if blob is not None and existing is not None and is_current(existing, blob.etag):
            counted += 1
            if publish is not None:
                jobs.record_outcome(job_id, name, "ok" if existing.status == "ok" else "rejected")
            continue
        if blob is None:
            # Gone since listing: the worker turns it into a `source_missing` record, like any other task.
            missing += 1
            blob = ListedBlob(name, etag="", size=0, content_type=None)
        requeue.append(task_for(job_id, spec, blob))
    if publish is not None and requeue:
        publish(requeue)
    return ReconcileReport(job_id, len(listed), len(finished), counted, len(requeue), missing)
