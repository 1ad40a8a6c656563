"""The image task: thin — validate the contract, guard against poison pills and outages, run the pipeline.

Cross-cutting concerns enter here, at the edge: every image's outcome and every retry is one log line with its facts
(worker/logs.py) and a few in-memory metric updates (worker/metrics.py); the pipeline only measures its stages.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject, Retry
from pydantic import ValidationError

from worker import metrics
from worker.contracts import TASK_NAME, ImageTask
from worker.deployment import Deployment
from worker.errors import CircuitOpenError, ConfigurationError, RejectionCode
from worker.logs import event
from worker.pipeline import ImageOutcome, give_up, process_image
from worker.presence import Presence
from worker.retry import POISON_PILL_MESSAGE, GiveUp, backoff_delay, decide, is_poison_pill
from worker.runtime import ProcessResources, ServiceResources, WorkerResources
from worker.scoring import ScoringConfigurationError, ScoringUnavailableError
from worker.services import queue_name
from worker.settings import Settings

log = logging.getLogger(__name__)
# Where a task of another account goes when its own namespace is ours (two deployments configured with one
# namespace): a queue no worker consumes, so it waits there, untouched, instead of bouncing between workers.
MISROUTED_SUFFIX = ".misrouted"
# A hash under the deployment's key prefix: foreign tasks handed back, by the namespace they belong to.
MISROUTED_KEY = "misrouted"


def register_tasks(app: Celery, settings: Settings, resources: ProcessResources, presence: Presence) -> None:
    """Register the image task on `app`."""
    home = settings.deployment  # fixed for the process: checked against every task before anything is done

    @app.task(name=TASK_NAME, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
    def score_image(self: Task, message: dict[str, Any], breaker_waits: int = 0) -> str:
        started = time.perf_counter()
        try:
            task = ImageTask.from_message(message)
        except ValidationError as exc:
            # Nothing identifies a job to count it against: refuse loudly, never retry a malformed message.
            log.error("refused malformed task message: %s", exc.errors(include_input=False))
            metrics.REFUSED.inc()
            return "refused"
        if not home.owns(task.namespace, task.account):
            return _hand_back(self, task, message, breaker_waits, home, settings, resources)
        presence.took(settings.queue_for(task.service))
        in_flight = metrics.in_flight(task.service)
        in_flight.inc()
        try:
            outcome = _guarded(self, task, resources.get(), settings, breaker_waits)
            _report(task, outcome, started)
            return outcome.status
        except Retry:
            raise
        except Exception as exc:
            # Our own bookkeeping failed (Redis or Blob unreachable). An exception escaping here would ack or drop
            # the message with no result, so it is always retried; if even that fails, the unacked message
            # comes back after the visibility timeout.
            log.warning("retrying %s/%s after a bookkeeping failure: %s", task.container, task.blob, exc,
                        extra=_retry_fields(task, exc, int(self.request.retries), None))
            metrics.observe_retry(task.service, error_reason(exc), exc)
            try:
                raise self.retry(
                    exc=exc, countdown=backoff_delay(self.request.retries, settings.retry_backoff_max_s)
                ) from exc
            except Reject as rejected:
                # Celery turns a retry it cannot publish (the broker is down) into a reject *without* requeue,
                # which would drop the message with no result counted: give it back instead. If even that cannot
                # reach the broker, the message stays unacked and returns after the visibility timeout.
                raise Reject(rejected.reason, requeue=True) from exc
        finally:
            in_flight.dec()
            metrics.task_histogram(task.service).observe(time.perf_counter() - started)


def home_queue(task: ImageTask, home: Deployment, settings: Settings) -> str:
    """The queue a foreign task belongs on: its own deployment's queue for its service, never one of ours."""
    queue = queue_name(settings.queue, task.namespace, task.service)
    return queue + MISROUTED_SUFFIX if task.namespace == home.namespace else queue


def _hand_back(
    task_self: Task, task: ImageTask, message: dict[str, Any], breaker_waits: int, home: Deployment,
    settings: Settings, resources: ProcessResources,
) -> str:
    """Give a task of another deployment or account back, untouched: no download, no score, no write, no count."""
    target = home_queue(task, home, settings)
    log.warning(
        "handed back %s/%s of job %s: it was listed from storage account %s at %s (namespace %s), this worker "
        "serves %s (namespace %s); requeued on %s", task.container, task.blob, task.job_id, task.account,
        task.endpoint, task.namespace, home.account, home.namespace, target,
    )
    try:
        task_self.app.send_task(
            TASK_NAME, args=[message], kwargs={"breaker_waits": breaker_waits}, queue=target, serializer="json",
            ignore_result=True, argsrepr=f"[{task.job_id}:{task.index}]", kwargsrepr="{}",
        )
    except Exception as exc:
        # Not handed over: keep the message (it returns to our queue) rather than ack it and lose it.
        raise Reject(f"could not hand back a foreign task: {exc}", requeue=True) from exc
    metrics.HANDED_BACK.inc()
    with contextlib.suppress(Exception):  # a count is not worth failing the hand-back for
        resources.get().redis.hincrby(f"{settings.key_prefix}{MISROUTED_KEY}", task.namespace, 1)
    return "handed_back"


def is_repeat_delivery(task_self: Task) -> bool:
    """A retry, or a message the broker restored after a worker died or shut down (kombu marks those)."""
    delivery_info = task_self.request.delivery_info or {}
    return bool(task_self.request.retries) or bool(delivery_info.get("redelivered"))


def _guarded(
    task_self: Task, task: ImageTask, worker: WorkerResources, settings: Settings, breaker_waits: int
) -> ImageOutcome:
    """Poison-pill guard around one run: a redelivered start that never finishes (crash, hang) is counted.

    A first delivery costs no Redis call here: an image that kills its worker comes back redelivered, and from
    then on every start is counted, so it is rejected after max_crash_attempts redeliveries.
    """
    if not is_repeat_delivery(task_self):
        return _run(task_self, task, worker, settings, breaker_waits)
    if is_poison_pill(worker.attempts.started(task.job_id, task.blob), worker.policy):
        log.error("poison pill %s/%s: its task never finished %d times", task.container, task.blob,
                  settings.max_crash_attempts, extra=_image_fields(task, outcome="give_up",
                                                                   code=RejectionCode.TOO_MANY_ATTEMPTS.value))
        outcome = give_up(task, worker.store, worker.jobs, _model_of(settings, task.service),
                          GiveUp(RejectionCode.TOO_MANY_ATTEMPTS, POISON_PILL_MESSAGE))
        worker.attempts.finished(task.job_id, task.blob)
        return outcome
    try:
        return _run(task_self, task, worker, settings, breaker_waits)
    finally:
        worker.attempts.finished(task.job_id, task.blob)


def _run(
    task_self: Task, task: ImageTask, worker: WorkerResources, settings: Settings, breaker_waits: int
) -> ImageOutcome:
    service: ServiceResources | None = None
    try:
        service = worker.for_service(task.service)
        service.breaker.check()
        outcome = process_image(task, service.deps, check_first=is_repeat_delivery(task_self))
    except Exception as exc:
        if service is not None:
            _feed_breaker(service, exc)
        retries = int(task_self.request.retries)
        decision = decide(exc, retries, breaker_waits, worker.policy)
        if isinstance(decision, GiveUp):
            log.error("giving up on %s/%s: %s", task.container, task.blob, decision.message,
                      extra=_image_fields(task, outcome="give_up", code=decision.code.value,
                                          reason=error_reason(exc), attempt=retries))
            return give_up(task, worker.store, worker.jobs, _model_of(settings, task.service), decision)
        log.warning("retrying %s/%s in %.1f s: %s", task.container, task.blob, decision.countdown_s, exc,
                    extra=_retry_fields(task, exc, retries, decision.countdown_s))
        worker.jobs.record_retry(task.job_id, task.blob)
        _note_error(worker, task, exc)
        metrics.observe_retry(task.service, error_reason(exc), exc)
        raise task_self.retry(
            exc=exc, countdown=decision.countdown_s,
            kwargs={"breaker_waits": breaker_waits + int(decision.breaker_wait)},
        ) from exc
    service.breaker.record_success()
    return outcome


def _report(task: ImageTask, outcome: ImageOutcome, started: float) -> None:
    """One image finished: its metrics, and one log line with its outcome and stage timings."""
    metrics.observe_image(task.service, outcome.status, outcome.code, outcome.written, outcome.timings_ms)
    if not log.isEnabledFor(logging.INFO):
        return
    what = outcome.status if outcome.written else "already_done"
    timings = {f"{stage}_ms": round(outcome.timings_ms[stage], 2) for stage in metrics.STAGES
               if stage in outcome.timings_ms}
    log.info("image %s%s", what, f" ({outcome.code})" if outcome.code else "", extra=_image_fields(
        task, outcome=what, status=outcome.status, code=outcome.code, **timings,
        task_ms=round((time.perf_counter() - started) * 1000.0, 2),
    ))


def _image_fields(task: ImageTask, **facts: Any) -> dict[str, Any]:
    """A log line's fields about one image (worker/logs.py): which job, blob and service, then `facts`."""
    return event(event="image", job_id=task.job_id, index=task.index, container=task.container, blob=task.blob,
                 service=task.service, **facts)


def _retry_fields(task: ImageTask, exc: BaseException, retries: int, countdown_s: float | None) -> dict[str, Any]:
    return event(event="retry", job_id=task.job_id, index=task.index, container=task.container, blob=task.blob,
                 service=task.service, outcome="retry", reason=error_reason(exc), attempt=retries,
                 countdown_s=None if countdown_s is None else round(countdown_s, 2))


def _feed_breaker(service: ServiceResources, exc: BaseException) -> None:
    """Outages count towards opening the service's breaker; a refused key or route opens it at once."""
    if isinstance(exc, ScoringUnavailableError):
        service.breaker.record_failure()
    elif isinstance(exc, ScoringConfigurationError):
        # A refused key or route (rotated since start-up): no call can succeed, so everyone waits on the
        # breaker, which shows why, instead of each image spending its retries.
        service.breaker.open_for(str(exc))


def error_reason(exc: BaseException) -> str:
    """The kind of error a job record counts: the gRPC status of a scoring error, else the error's class."""
    if isinstance(exc, CircuitOpenError):
        return "circuit_open"
    code = getattr(exc, "code", None)
    return str(code) if isinstance(code, str) else type(exc).__name__


def _note_error(worker: WorkerResources, task: ImageTask, exc: BaseException) -> None:
    # The message behind a waiting breaker is the error that opened it (a refused key names its setting).
    message = (exc.reason or str(exc)) if isinstance(exc, CircuitOpenError) else str(exc)
    with contextlib.suppress(Exception):  # a note is not worth failing the retry for
        worker.jobs.record_error(task.job_id, error_reason(exc), task.service, message)


def _model_of(settings: Settings, service: str) -> str:
    try:
        return settings.service_config(service).model
    except ConfigurationError:
        return "unknown"
