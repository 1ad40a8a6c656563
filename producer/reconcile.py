"""Reconcile a job: compare its listing with its results and re-queue every image that has neither."""

from __future__ import annotations

from dataclasses import dataclass

from producer.enqueue import Publish, task_for
from producer.listing import current_results
from worker.blob_listing import ListedBlob
from worker.contracts import ImageTask
from worker.job_records import bit_is_set
from worker.jobs import JobStore
from worker.results import is_current
from worker.storage import BlobStore


@dataclass(frozen=True)
class ReconcileReport:
    """What a reconciliation found and did."""

    job_id: str
    listed: int
    finished: int
    counted_from_results: int
    requeued: int
    source_missing: int


def unfinished_images(jobs: JobStore, job_id: str) -> dict[str, int]:
    """Listed images whose outcome the job has not counted: name -> index."""
    ok, rejected = jobs.outcome_bits(job_id, "ok"), jobs.outcome_bits(job_id, "rejected")
    unfinished: dict[str, int] = {}
    for first, names in jobs.listed_pages(job_id):
        for index, name in enumerate(names, start=first):
            if not bit_is_set(ok, index) and not bit_is_set(rejected, index):
                unfinished[name] = index
    return unfinished


def reconcile(store: BlobStore, jobs: JobStore, publish: Publish | None, job_id: str) -> ReconcileReport:
    """Count results the job missed (a crash after the upload) and re-queue images with no result at all.

    Re-queued images that were in fact still queued are scored once all the same: the worker finds the result
    the first delivery wrote. Without `publish` nothing is changed (a dry run).
    """
    spec, status, origin = jobs.spec(job_id), jobs.status(job_id), jobs.origin(job_id)
    unfinished = unfinished_images(jobs, job_id)
    results = current_results(store.list_metadata(spec.results_container, spec.results_prefix), spec.results_prefix)
    sources = {blob.name: blob for blob in store.list_blobs(spec.container, spec.prefix) if blob.name in unfinished}
    counted, missing = 0, 0
    requeue: list[ImageTask] = []
    for name, index in sorted(unfinished.items(), key=lambda item: item[1]):
        blob, existing = sources.get(name), results.get(name)
        if blob is not None and existing is not None and is_current(existing, blob.etag):
            counted += 1
            if publish is not None:
                jobs.record_outcome(job_id, index, name, "ok" if existing.status == "ok" else "rejected")
            continue
        if blob is None:
            # Gone since listing: the worker turns it into a `source_missing` record, like any other task.
            missing += 1
            blob = ListedBlob(name, etag="", size=0, content_type=None)
        requeue.append(task_for(job_id, index, spec, blob, origin))
    if publish is not None and requeue:
        publish(requeue)
    return ReconcileReport(job_id, status.listed, status.ok + status.rejected, counted, len(requeue), missing)
