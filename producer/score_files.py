"""`blobscore score`: local image files through a scoring service, one request per file, as result documents."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from worker.contracts import ImageTask, ResultDoc, SourceRef
from worker.errors import PermanentError, RejectionCode
from worker.pipeline import score_bytes
from worker.results import rejected_result
from worker.runtime import limits_from
from worker.scoring import Scorer
from worker.settings import Settings

LOCAL_JOB_ID = "local-files"


def _task_for(path: Path, data: bytes, service: str) -> tuple[ImageTask, SourceRef]:
    etag = hashlib.sha256(data).hexdigest()[:32]
    # Local files belong to no storage account: the task is only a carrier of names for the result document.
    task = ImageTask(namespace=LOCAL_JOB_ID, account="", endpoint="", job_id=LOCAL_JOB_ID, index=0, container="",
                     blob=str(path), etag=etag, size=len(data),
                     service=service, results_container="", results_prefix="")
    return task, SourceRef(container="", blob=str(path), etag=etag, size=len(data))


def score_files(paths: Iterable[Path], settings: Settings) -> Iterator[ResultDoc]:
    """The result document of each file, in order; the worker's exact checks, request and postprocessing."""
    service = settings.service_config()
    limits = limits_from(settings)
    scorer = Scorer.for_service(service, settings)
    profile = scorer.profile
    try:
        for path in paths:
            try:
                data = _read(path)
            except PermanentError as error:
                task, source = _task_for(path, b"", settings.service)
                yield rejected_result(task, source, profile.name, error, {})
                continue
            task, source = _task_for(path, data, settings.service)
            yield score_bytes(task, source, data, scorer, profile, limits)
    finally:
        scorer.close()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PermanentError(RejectionCode.SOURCE_MISSING, f"cannot read {path}: {exc.strerror}") from exc


def describe(doc: ResultDoc) -> str:
    """One human-readable line for a result."""
    if doc.error is not None:
        return f"{doc.source.blob}: rejected ({doc.error.code}: {doc.error.message})"
    if doc.detections is not None:
        found = ", ".join(f"{d.label} {d.score:.2f} at {[round(v) for v in d.box_px]}" for d in doc.detections)
        return f"{doc.source.blob}: {found or 'nothing detected'}"
    labels = ", ".join(f"{label.label} {label.score:.3f}" for label in doc.labels or [])
    return f"{doc.source.blob}: {labels}"
