"""Create a job: list the images, skip those with a current result, record and publish one task per image."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from itertools import islice

from producer.listing import DEFAULT_RESULTS_ROOT, current_results, needs_scoring, select_images
from worker.contracts import ImageTask
from worker.jobs import JobSpec, JobStore
from worker.storage import BlobStore, ListedBlob

PAGE = 1000
Publish = Callable[[list[ImageTask]], None]


@dataclass(frozen=True)
class EnqueueReport:
    """What an enqueue did."""

    job_id: str | None
    listed: int
    skipped_current: int


def excluded_prefixes(spec: JobSpec) -> tuple[str, ...]:
    """Prefixes never scored in the source container: the results, when they share it."""
    if spec.results_container != spec.container:
        return ()
    return tuple({spec.results_prefix, DEFAULT_RESULTS_ROOT})


def images_to_score(
    store: BlobStore, spec: JobSpec, limit: int | None, exclude: Collection[str] = ()
) -> tuple[Iterator[ListedBlob], list[int]]:
    """Images under the job's prefix lacking a current result and not in `exclude`; the second value counts skips."""
    results = current_results(store.list_metadata(spec.results_container, spec.results_prefix), spec.results_prefix)
    skipped = [0]

    def wanted() -> Iterator[ListedBlob]:
        for blob in select_images(store.list_blobs(spec.container, spec.prefix), excluded_prefixes(spec)):
            if blob.name not in exclude and needs_scoring(blob, results):
                yield blob
            else:
                skipped[0] += 1

    return islice(wanted(), limit), skipped


def task_for(job_id: str, spec: JobSpec, blob: ListedBlob) -> ImageTask:
    """The task message of one image."""
    return ImageTask(
        job_id=job_id, container=spec.container, blob=blob.name, etag=blob.etag, size=blob.size,
        service=spec.service, results_container=spec.results_container, results_prefix=spec.results_prefix,
    )


def enqueue(
    store: BlobStore,
    jobs: JobStore | None,
    publish: Publish | None,
    spec: JobSpec,
    limit: int | None = None,
    exclude: Collection[str] = (),
) -> EnqueueReport:
    """Run the listing; with `jobs` and `publish` create the job and queue its tasks, else only count (dry run).

    `exclude` names images another job still has queued (e.g. a scheduled run's unfinished predecessor).
    """
    blobs, skipped = images_to_score(store, spec, limit, exclude)
    if jobs is None or publish is None:
        return EnqueueReport(None, sum(1 for _ in blobs), skipped[0])
    job_id = jobs.create(spec)
    listed = 0
    while page := list(islice(blobs, PAGE)):
        tasks = [task_for(job_id, spec, blob) for blob in page]
        # Listed before published: the job can never look done while tasks of this page are unpublished.
        jobs.add_listed(job_id, [task.blob for task in tasks])
        publish(tasks)
        listed += len(tasks)
    jobs.finish_listing(job_id)
    return EnqueueReport(job_id, listed, skipped[0])
