"""Create or resume a job: list page by page, skip current results, publish within a window of queued tasks."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from producer.listing import (
    DEFAULT_RESULTS_ROOT,
    ResultsCursor,
    ResultsPage,
    needs_scoring,
    results_for_page,
    select_images,
)
from worker.blob_listing import ListedBlob, ListingPage
from worker.contracts import ImageTask
from worker.deployment import Deployment
from worker.jobs import JobSpec, JobStore
from worker.results import ExistingResult
from worker.storage import BlobStore

Publish = Callable[[list[ImageTask]], None]
WINDOW_POLL_S = 0.5


@dataclass(frozen=True)
class EnqueueReport:
    """What an enqueue did."""

    job_id: str | None
    listed: int
    skipped_current: int


@dataclass(frozen=True)
class EnqueueOptions:
    """How much to queue and how fast."""

    limit: int | None = None
    exclude: Collection[str] = ()
    # At most this many of the job's tasks wait in the broker at once: broker memory stays bounded.
    window: int = 40_000
    page_size: int = 5000


def excluded_prefixes(spec: JobSpec) -> tuple[str, ...]:
    """Prefixes never scored in the source container: the results, when they share it."""
    if spec.results_container != spec.container:
        return ()
    return tuple({spec.results_prefix, DEFAULT_RESULTS_ROOT})


def task_for(job_id: str, index: int, spec: JobSpec, blob: ListedBlob, origin: Deployment) -> ImageTask:
    """The task message of one image, stamped with the deployment and account it was listed from."""
    return ImageTask(
        namespace=origin.namespace, account=origin.account.name, endpoint=origin.account.endpoint,
        job_id=job_id, index=index, container=spec.container, blob=blob.name, etag=blob.etag, size=blob.size,
        service=spec.service, results_container=spec.results_container, results_prefix=spec.results_prefix,
    )


def wanted_on_page(
    page: ListingPage, spec: JobSpec, results: Mapping[str, ExistingResult], exclude: Collection[str]
) -> tuple[list[ListedBlob], int]:
    """The page's images that need scoring, and how many were skipped because their result is current."""
    wanted, skipped = [], 0
    for blob in select_images(page.blobs, excluded_prefixes(spec)):
        if blob.name in exclude:
            continue
        if needs_scoring(blob, results):
            wanted.append(blob)
        else:
            skipped += 1
    return wanted, skipped


class _Window:
    """Blocks publishing while the job already has `size` tasks waiting in the broker."""

    def __init__(self, jobs: JobStore, job_id: str, size: int) -> None:
        self._jobs, self._job_id, self._size = jobs, job_id, size

    def wait_for_room(self, published: int, adding: int) -> None:
        while published + adding - self._jobs.finished_count(self._job_id) > max(self._size, adding):
            time.sleep(WINDOW_POLL_S)


def count_only(store: BlobStore, spec: JobSpec, options: EnqueueOptions) -> EnqueueReport:
    """A dry run: how many images a job would queue and skip."""
    cursor, listed, skipped = ResultsCursor(), 0, 0
    for page in store.list_pages(spec.container, spec.prefix, None, options.page_size):
        results, cursor = page_results(store, spec, page, cursor)
        wanted, page_skipped = wanted_on_page(page, spec, results, options.exclude)
        listed, skipped = listed + len(wanted), skipped + page_skipped
    return EnqueueReport(None, listed if options.limit is None else min(listed, options.limit), skipped)


def enqueue(
    store: BlobStore, jobs: JobStore, publish: Publish, spec: JobSpec, origin: Deployment,
    options: EnqueueOptions | None = None,
) -> EnqueueReport:
    """Create a job of deployment `origin` and queue one task per image lacking a current result."""
    return run_listing(store, jobs, publish, jobs.create(spec, origin), options or EnqueueOptions())


def run_listing(
    store: BlobStore, jobs: JobStore, publish: Publish, job_id: str, options: EnqueueOptions,
    on_page: Callable[[int, int], None] | None = None,
) -> EnqueueReport:
    """List (from where the job's listing stopped) and publish page by page, within the window.

    A page is recorded before it is published and the continuation token saved after, so a producer killed
    at any point resumes by re-listing at most one page; its re-published tasks find their results.
    """
    spec, progress, origin = jobs.spec(job_id), jobs.progress(job_id), jobs.origin(job_id)
    if progress.done:
        return EnqueueReport(job_id, progress.next_index, 0)
    window = _Window(jobs, job_id, options.window)
    index, page_no, skipped, cursor = progress.next_index, progress.next_page, 0, ResultsCursor()
    for page in store.list_pages(spec.container, spec.prefix, progress.continuation, options.page_size):
        results, cursor = page_results(store, spec, page, cursor)
        wanted, page_skipped = wanted_on_page(page, spec, results, options.exclude)
        wanted = wanted[: _room(options.limit, index)]
        skipped += page_skipped
        if wanted:
            jobs.record_page(job_id, page_no, index, [blob.name for blob in wanted])
            window.wait_for_room(index, len(wanted))
            publish([task_for(job_id, index + offset, spec, blob, origin) for offset, blob in enumerate(wanted)])
            index, page_no = index + len(wanted), page_no + 1
        jobs.advance(job_id, page.continuation, index, page_no)
        if on_page is not None:
            on_page(index, page_no)
        if _room(options.limit, index) == 0:
            break
    jobs.finish_listing(job_id)
    return EnqueueReport(job_id, index, skipped)


def _room(limit: int | None, index: int) -> int | None:
    return None if limit is None else max(limit - index, 0)


def page_results(
    store: BlobStore, spec: JobSpec, page: ListingPage, cursor: ResultsCursor
) -> tuple[dict[str, ExistingResult], ResultsCursor]:
    """The stored results of a page's images, merged with the results listing (never all results at once)."""
    names = [blob.name for blob in select_images(page.blobs, excluded_prefixes(spec))]

    def read(continuation: str | None) -> ResultsPage:
        return store.metadata_page(spec.results_container, spec.results_prefix, continuation)

    return results_for_page(names, cursor, spec.results_prefix, read)
