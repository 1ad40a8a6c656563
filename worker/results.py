"""Pure rules for results: where a result blob lives, what it says, and when an existing one is current."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from worker.contracts import DetectionDoc, ErrorDoc, ImageTask, LabelDoc, ResultDoc, ServiceRef, SourceRef
from worker.errors import PermanentError
from worker.models.postprocess import Prediction

RESULT_SUFFIX = ".json"
# Azure Storage's limit on a blob name's length, in characters.
MAX_BLOB_NAME = 1024
UNADDRESSABLE_DIR = ".blobscore-unaddressable/"
# Blob metadata on each result: lets a retry recognise its own write and a re-run see what a result describes.
META_SOURCE_ETAG = "blobscore_source_etag"
META_STATUS = "blobscore_status"
META_JOB = "blobscore_job"
META_CODE = "blobscore_code"


def result_blob_name(results_prefix: str, source_blob: str) -> str:
    """`<results-prefix><source blob name>.json` — deterministic, so a re-run finds its earlier result."""
    return f"{results_prefix}{source_blob}{RESULT_SUFFIX}"


def unaddressable_reason(results_prefix: str, source_blob: str) -> str | None:
    """Why no result can be written at `<prefix><name>.json` for this name (None when it can be)."""
    if any(segment in (".", "..") for segment in source_blob.split("/")):
        return "a '.' or '..' path segment collapses in a URL: the blob cannot be addressed over HTTP"
    if len(result_blob_name(results_prefix, source_blob)) > MAX_BLOB_NAME:
        return f"its result name would be over the {MAX_BLOB_NAME} characters a blob name may have"
    return None


def result_location(results_prefix: str, source_blob: str) -> tuple[str, str | None]:
    """Where the result goes, and why it cannot go at its usual name when it cannot.

    Such an image gets its `rejected` record under the results prefix all the same, at a name derived from a
    hash of the source name (the document carries the source name), so the job still ends and nothing is silent.
    """
    reason = unaddressable_reason(results_prefix, source_blob)
    if reason is None:
        return result_blob_name(results_prefix, source_blob), None
    digest = hashlib.sha256(source_blob.encode("utf-8")).hexdigest()
    return f"{results_prefix}{UNADDRESSABLE_DIR}{digest}{RESULT_SUFFIX}", reason


def source_blob_name(results_prefix: str, result_blob: str) -> str | None:
    """The source blob a result blob name belongs to, or None when it is not a result under that prefix."""
    if not result_blob.startswith(results_prefix) or not result_blob.endswith(RESULT_SUFFIX):
        return None
    return result_blob[len(results_prefix) : -len(RESULT_SUFFIX)]


@dataclass(frozen=True)
class ExistingResult:
    """What the metadata of a stored result says about it."""

    source_etag: str
    status: str
    code: str | None
    job_id: str


# Rejections that say nothing about the image itself: a later run should try it again.
RETRYABLE_REJECTION_CODES = frozenset({"retries_exhausted", "internal_error"})


def is_current(existing: ExistingResult | None, source_etag: str) -> bool:
    """True when a stored result already answers for this exact source version."""
    if existing is None or existing.source_etag != source_etag:
        return False
    return existing.code not in RETRYABLE_REJECTION_CODES


def result_metadata(doc: ResultDoc) -> dict[str, str]:
    """Blob metadata written with a result document."""
    metadata = {META_SOURCE_ETAG: doc.source.etag, META_STATUS: doc.status, META_JOB: doc.job_id}
    if doc.error is not None:
        metadata[META_CODE] = doc.error.code
    return metadata


def existing_from_metadata(metadata: dict[str, str]) -> ExistingResult | None:
    """Read ExistingResult back from blob metadata (None for a blob we did not write)."""
    if META_SOURCE_ETAG not in metadata:
        return None
    return ExistingResult(
        source_etag=metadata[META_SOURCE_ETAG],
        status=metadata.get(META_STATUS, ""),
        code=metadata.get(META_CODE),
        job_id=metadata.get(META_JOB, ""),
    )


def utc_now_rfc3339() -> str:
    """The current time as RFC 3339 UTC with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ok_result(
    task: ImageTask, source: SourceRef, model: str, prediction: Prediction, timings_ms: dict[str, float]
) -> ResultDoc:
    """A result for an image that was scored: `labels` for a classifier, `detections` for a detector."""
    labels = detections = None
    if prediction.labels is not None:
        labels = [LabelDoc(class_id=lab.class_id, label=lab.label, score=lab.score) for lab in prediction.labels]
    if prediction.detections is not None:
        detections = [
            DetectionDoc(class_id=d.class_id, label=d.label, score=d.score, box=list(d.box), box_px=list(d.box_px))
            for d in prediction.detections
        ]
    return ResultDoc(
        status="ok",
        job_id=task.job_id,
        source=source,
        service=ServiceRef(name=task.service, model=model),
        labels=labels,
        detections=detections,
        scored_at=utc_now_rfc3339(),
        timings_ms=_rounded(timings_ms),
    )


def rejected_result(
    task: ImageTask, source: SourceRef, model: str, error: PermanentError, timings_ms: dict[str, float]
) -> ResultDoc:
    """A result for an image that can never be scored, saying why."""
    return ResultDoc(
        status="rejected",
        job_id=task.job_id,
        source=source,
        service=ServiceRef(name=task.service, model=model),
        error=ErrorDoc(code=str(error.code), message=error.message),
        scored_at=utc_now_rfc3339(),
        timings_ms=_rounded(timings_ms),
    )


def _rounded(timings_ms: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 3) for name, value in timings_ms.items()}
