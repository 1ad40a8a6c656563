"""A job's result documents, and their CSV and table renderings."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator

from rich.table import Table

from worker.contracts import ResultDoc
from worker.jobs import JobStore
from worker.results import result_location
from worker.storage import BlobNotFoundError, BlobStore

CSV_COLUMNS = ("container", "blob", "status", "class_id", "label", "score", "error_code", "etag", "scored_at")


def job_results(store: BlobStore, jobs: JobStore, job_id: str) -> list[ResultDoc]:
    """The stored result of every image the job finished, sorted by blob name."""
    spec = jobs.spec(job_id)
    names = sorted({*jobs.members(job_id, "ok"), *jobs.members(job_id, "rejected")})
    return list(_read_all(store, spec.results_container, spec.results_prefix, names))


def _read_all(store: BlobStore, container: str, prefix: str, names: Iterable[str]) -> Iterator[ResultDoc]:
    for name in names:
        try:
            yield ResultDoc.from_json(store.read(container, result_location(prefix, name)[0]))
        except BlobNotFoundError:
            continue


def _row(doc: ResultDoc) -> tuple[object, ...]:
    top = doc.labels[0] if doc.labels else None
    return (
        doc.source.container, doc.source.blob, doc.status,
        top.class_id if top else "", top.label if top else "", top.score if top else "",
        doc.error.code if doc.error else "", doc.source.etag, doc.scored_at,
    )


def to_csv(docs: Iterable[ResultDoc]) -> str:
    """One CSV row per result: top-1 label or error code."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    writer.writerows(_row(doc) for doc in docs)
    return buffer.getvalue()


def to_table(docs: Iterable[ResultDoc]) -> Table:
    """A table of image -> top-1 label and score, or the rejection code in a column of its own."""
    table = Table("image", "status", "top-1 label", "score", "rejection")
    for doc in docs:
        top = doc.labels[0] if doc.labels else None
        if top is not None:
            table.add_row(doc.source.blob, doc.status, top.label, f"{top.score:.3f}", "")
        else:
            table.add_row(doc.source.blob, doc.status, "", "", doc.error.code if doc.error else "")
    return table
