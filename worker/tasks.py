"""The image task: thin — validate the contract, run the pipeline, apply the retry policy."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from pydantic import ValidationError

from worker.contracts import TASK_NAME, ImageTask, SourceRef
from worker.errors import PermanentError, RejectionCode
from worker.pipeline import process_image
from worker.results import rejected_result, result_blob_name, result_metadata
from worker.retry import backoff_delay, should_retry
from worker.runtime import ProcessResources
from worker.settings import Settings

log = logging.getLogger(__name__)


def register_tasks(app: Celery, settings: Settings, resources: ProcessResources) -> None:
    """Register the image task on `app`."""

    @app.task(name=TASK_NAME, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
    def score_image(self: Task, message: dict[str, Any]) -> str:
        try:
            task = ImageTask.from_message(message)
        except ValidationError as exc:
            # Nothing identifies a job to count it against: refuse loudly, never retry a malformed message.
            log.error("refused malformed task message: %s", exc.errors(include_input=False))
            return "refused"
        deps = resources.get()
        try:
            return process_image(task, deps).status
        except Exception as exc:
            if not should_retry(exc):
                raise
            attempt = int(self.request.retries)
            if attempt >= settings.max_transient_retries:
                return _give_up(task, resources, exc)
            log.warning("retrying %s/%s (attempt %d): %s", task.container, task.blob, attempt + 1, exc)
            deps.jobs.record_retry(task.job_id, task.blob)
            raise self.retry(exc=exc, countdown=backoff_delay(attempt, settings.retry_backoff_max_s)) from exc


def _give_up(task: ImageTask, resources: ProcessResources, exc: Exception) -> str:
    """After the last retry the image gets a `rejected` result a later run will try again: never silence."""
    deps = resources.get()
    error = PermanentError(RejectionCode.RETRIES_EXHAUSTED, f"gave up after retries: {exc}")
    source = SourceRef(container=task.container, blob=task.blob, etag=task.etag, size=task.size)
    doc = rejected_result(task, source, deps.profile.name, error, {})
    name = result_blob_name(task.results_prefix, task.blob)
    existing, etag = deps.store.existing_result(task.results_container, name)
    if existing is None or existing.source_etag != task.etag:
        deps.store.write_result(task.results_container, name, doc.to_json(), result_metadata(doc), etag)
    deps.jobs.record_outcome(task.job_id, task.blob, "rejected")
    return "rejected"
