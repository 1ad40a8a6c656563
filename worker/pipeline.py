"""The path of one image: result check -> download -> check -> score -> postprocess -> create-only result write."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from worker.contracts import ImageTask, ResizeDoc, ResultDoc, SourceRef
from worker.errors import PermanentError, RejectionCode
from worker.imaging import check_image, shrink_for_model
from worker.jobs import JobStore
from worker.models.catalog import ModelProfile
from worker.models.postprocess import PostprocessOptions, postprocess
from worker.results import (
    ExistingResult,
    is_current,
    ok_result,
    rejected_result,
    result_location,
    result_metadata,
)
from worker.retry import GiveUp
from worker.storage import BlobStore, ResultConflictError

log = logging.getLogger(__name__)

Status = Literal["ok", "rejected"]


class Predictor(Protocol):
    """Anything that scores one image: the gRPC scorer, or a fake in unit tests (tests/unit/test_pipeline.py)."""

    def predict(self, image: bytes) -> dict[str, npt.NDArray[np.float32]]:
        """The output tensors for one image."""
        ...


@dataclass(frozen=True)
class Limits:
    """Input limits and postprocessing options, from the settings."""

    max_image_bytes: int
    max_image_pixels: int
    postprocess: PostprocessOptions
    # When set, photos whose short side is over twice this are sent as a smaller copy (off by default: the FPGA
    # graph does its own preprocessing of the original bytes).
    shrink_short_side: int | None = None
    # Also decode the whole image before sending it (settings.image_check == "decode"), not only read its structure.
    full_decode: bool = False


@dataclass(frozen=True)
class ImageOutcome:
    """How one task ended: a new result written, or an existing current one found.

    `code` is a written rejection's code; `timings_ms` the stages this task went through (download, check, score,
    upload), for the task edge's metrics and log line (the result document keeps download and score only).
    """

    status: Status
    written: bool
    result_blob: str
    code: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Dependencies:
    """The per-process adapters one image needs."""

    store: BlobStore
    jobs: JobStore
    scorer: Predictor
    profile: ModelProfile
    limits: Limits


def process_image(task: ImageTask, deps: Dependencies, *, check_first: bool = True) -> ImageOutcome:
    """Score one image and write its one result.

    With `check_first` (a redelivered or retried task) an existing current result is found before anything
    is downloaded or scored. A first delivery skips that request: the producer queued the image because it had
    no current result, and the create-only write below still refuses to write a second one.
    """
    name, unaddressable = result_location(task.results_prefix, task.blob)
    if unaddressable is not None:
        return _reject_unaddressable(task, deps, name, unaddressable)
    existing, result_etag = (None, None)
    if check_first:
        existing, result_etag = deps.store.existing_result(task.results_container, name)
        if existing is not None and is_current(existing, task.etag):
            return _already_done(task, deps.jobs, existing, name)
    stages: dict[str, float] = {}
    doc = score_to_result(task, deps, stages)
    if existing is not None and is_current(existing, doc.source.etag):
        return _already_done(task, deps.jobs, existing, name)
    return write_once(task, deps.store, deps.jobs, doc, name, result_etag, stages)


def _reject_unaddressable(task: ImageTask, deps: Dependencies, name: str, reason: str) -> ImageOutcome:
    source = SourceRef(container=task.container, blob=task.blob, etag=task.etag, size=task.size)
    error = PermanentError(RejectionCode.UNADDRESSABLE_NAME, f"no result can be written for this name: {reason}")
    log.debug("rejected %s/%s: %s", task.container, task.blob, error.code)  # the task logs the outcome
    return write_once(task, deps.store, deps.jobs, rejected_result(task, source, deps.profile.name, error, {}), name,
                      None)


def give_up(task: ImageTask, store: BlobStore, jobs: JobStore, model: str, decision: GiveUp) -> ImageOutcome:
    """Record an image we stop trying as `rejected` through the one write path (a later job tries it again).

    A result already answering for this source version (written by a delivery that got further) is kept.
    """
    name, _ = result_location(task.results_prefix, task.blob)
    existing, result_etag = store.existing_result(task.results_container, name)
    if existing is not None and existing.source_etag == task.etag:
        return _already_done(task, jobs, existing, name)
    source = SourceRef(container=task.container, blob=task.blob, etag=task.etag, size=task.size)
    doc = rejected_result(task, source, model, PermanentError(decision.code, decision.message), {})
    return write_once(task, store, jobs, doc, name, result_etag)


def write_once(
    task: ImageTask, store: BlobStore, jobs: JobStore, doc: ResultDoc, name: str, result_etag: str | None,
    stages: dict[str, float] | None = None,
) -> ImageOutcome:
    """The one way a result is written: create it (or replace exactly the stale version read), recognising a write
    that beat ours, then count the image's outcome once. `stages`: timings the document does not keep (check)."""
    body, metadata = doc.to_json(), result_metadata(doc)
    started = time.perf_counter()
    try:
        store.write_result(task.results_container, name, body, metadata, replaces_etag=result_etag)
    except ResultConflictError:
        # Another delivery (or a lost reply of our own upload) wrote first, or a result of an older version.
        winner, winner_etag = store.existing_result(task.results_container, name)
        if winner is not None and is_current(winner, doc.source.etag):
            return _already_done(task, jobs, winner, name)
        if result_etag is not None or winner_etag is None or winner is None:
            raise
        current_source = store.source_etag(task.container, task.blob)
        # A stored result of this very version that is not current is a retryable rejection (retries_exhausted,
        # internal_error) an earlier job gave up with: this job scored the image, so it is replaced below.
        if winner.source_etag != doc.source.etag and current_source == winner.source_etag:
            # The stored result describes the source as it is now (it changed after our download): keep it.
            return _already_done(task, jobs, winner, name)
        if current_source != doc.source.etag:
            raise ResultConflictError(f"{task.blob} changed again while it was scored") from None
        # A result of an older source version: replace exactly the version just read.
        store.write_result(task.results_container, name, body, metadata, replaces_etag=winner_etag)
    upload_ms = _ms_since(started)
    jobs.record_outcome(task.job_id, task.index, task.blob, doc.status)
    return ImageOutcome(doc.status, written=True, result_blob=name, code=doc.error.code if doc.error else None,
                        timings_ms={**doc.timings_ms, **(stages or {}), "upload": upload_ms})


def score_to_result(task: ImageTask, deps: Dependencies, stages: dict[str, float] | None = None) -> ResultDoc:
    """Download the image, then score it (see score_bytes)."""
    timings: dict[str, float] = {}
    source = SourceRef(container=task.container, blob=task.blob, etag=task.etag, size=task.size)
    try:
        started = time.perf_counter()
        downloaded = deps.store.download(task.container, task.blob, deps.limits.max_image_bytes)
        timings["download"] = _ms_since(started)
    except PermanentError as error:
        log.debug("rejected %s/%s: %s", task.container, task.blob, error.code)  # the task logs the outcome
        return rejected_result(task, source, deps.profile.name, error, timings)
    source = SourceRef(container=task.container, blob=task.blob, etag=downloaded.etag, size=downloaded.size)
    return score_bytes(task, source, downloaded.data, deps.scorer, deps.profile, deps.limits, timings, stages)


def score_bytes(
    task: ImageTask,
    source: SourceRef,
    data: bytes,
    scorer: Predictor,
    profile: ModelProfile,
    limits: Limits,
    timings: dict[str, float] | None = None,
    stages: dict[str, float] | None = None,
) -> ResultDoc:
    """Check and score one image's bytes; a PermanentError becomes a `rejected` result, anything else raises.

    The check's time goes to `stages` (when given), not into the document's `timings_ms`.
    """
    timings = dict(timings or {})
    started = time.perf_counter()
    try:
        facts = check_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels,
                            decode=limits.full_decode)
        if stages is not None:
            stages["check"] = _ms_since(started)
        shrunk = shrink_for_model(data, facts, limits.shrink_short_side) if limits.shrink_short_side else None
        started = time.perf_counter()
        outputs = scorer.predict(shrunk.data if shrunk else data)
        timings["score"] = _ms_since(started)
        prediction = postprocess(profile, outputs, (facts.width, facts.height), limits.postprocess)
    except PermanentError as error:
        if stages is not None and "check" not in stages:
            stages["check"] = _ms_since(started)  # the check rejected it
        log.debug("rejected %s/%s: %s", task.container, task.blob, error.code)  # the task logs the outcome
        return rejected_result(task, source, profile.name, error, timings)
    doc = ok_result(task, source, profile.name, prediction, timings)
    if shrunk is None:
        return doc
    return doc.model_copy(update={"resized": ResizeDoc(original=list(shrunk.original), sent=list(shrunk.size))})


def _already_done(task: ImageTask, jobs: JobStore, existing: ExistingResult, name: str) -> ImageOutcome:
    status: Status = "ok" if existing.status == "ok" else "rejected"
    jobs.record_outcome(task.job_id, task.index, task.blob, status)
    return ImageOutcome(status, written=False, result_blob=name)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
