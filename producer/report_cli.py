"""`blobscore report JOB --html FILE`: a job's results as one self-contained HTML page (see producer/report.py)."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from producer import exports
from producer.job_cli import check_origin
from producer.report import make_thumbnail, render_report
from producer.report_figures import select_images
from worker.contracts import ResultDoc, normalize_etag
from worker.errors import BlobscoreError
from worker.jobs import JobStore
from worker.settings import load_settings
from worker.storage import BlobStore

report_app = typer.Typer()
console = Console(stderr=True)
# Source blobs downloaded at once for thumbnails: Blob Storage latency, not CPU, is what they wait on.
DOWNLOAD_THREADS = 8


def _thumbnail_of(store: BlobStore, doc: ResultDoc, max_bytes: int) -> bytes | None:
    """The scored version's thumbnail, or None when its source blob is gone, changed, too large or undecodable."""
    try:
        downloaded = store.download(doc.source.container, doc.source.blob, max_bytes)
    except BlobscoreError:
        return None
    # A newer version's picture next to the old version's labels would mislead.
    if normalize_etag(downloaded.etag) != normalize_etag(doc.source.etag):
        return None
    return make_thumbnail(downloaded.data)


def fetch_thumbnails(store: BlobStore, docs: Iterable[ResultDoc], max_bytes: int) -> dict[str, bytes]:
    """Thumbnails of the given images' source blobs, by blob name (those that could be made)."""
    wanted = list(docs)
    with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS) as pool:
        made = pool.map(lambda doc: _thumbnail_of(store, doc, max_bytes), wanted)
        return {doc.source.blob: thumb for doc, thumb in zip(wanted, made, strict=True) if thumb is not None}


def _write(path: Path, page: str) -> None:
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise BlobscoreError(f"cannot write the report to {path}: {exc.strerror or exc}") from exc


@report_app.command("report")
def report(
    job_id: Annotated[str, typer.Argument(help="The job id enqueue printed.")],
    html: Annotated[Path, typer.Option("--html", help="Where to write the self-contained HTML page.")],
) -> None:
    """Write a job's summary, every image's top labels over its thumbnail, and its rejections as one HTML file.

    The page fetches nothing (thumbnails embedded, no script) and stays under 25 MB: first 500 images + a sample of 500.
    """
    settings = load_settings()
    jobs = JobStore.from_settings(settings)
    check_origin(jobs, job_id, settings)
    store = BlobStore.from_settings(settings)
    status, spec = jobs.status(job_id), jobs.spec(job_id)
    docs = exports.job_results(store, jobs, job_id)
    selection = select_images(docs)
    thumbnails = fetch_thumbnails(store, selection.shown, settings.max_image_bytes)
    page = render_report(status, docs, thumbnails, spec=spec, selection=selection)
    _write(html, page)
    console.print(f"wrote {html}: {len(selection.shown)} of {selection.total} scored images, {status.rejected} "
                  f"rejected, {len(page.encode('utf-8')) / 1e6:.1f} MB", markup=False, highlight=False)
