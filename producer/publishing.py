"""Publish image tasks to the broker in batches (kombu's batch publishing: one Redis pipeline a batch), JSON only.

The first task of every call goes through Celery's `send_task`, which routes it, builds its protocol-2 message and
publishes it; the arguments it hands to kombu's `Producer.publish` are kept as a template. The call's other tasks
are published through the same `Producer.publish` with that template, only their own task id, body and
`argsrepr` changed: the same message Celery would build (tests compare them byte for byte apart from the ids),
without Celery's per-message routing, registry look-ups, signals and queue declaration, which cost more than the
listing itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu.utils.uuid import uuid

from worker.contracts import TASK_NAME, ImageTask

BATCH = 1000


@dataclass(frozen=True)
class _Template:
    """What Celery passed to Producer.publish for one task: its body and every keyword argument."""

    body: tuple[Any, ...]
    options: dict[str, Any]

    def message_for(self, task: ImageTask) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The body and publish arguments of `task`: the template's, with this task's id, arguments and repr."""
        task_id, argsrepr = uuid(), _argsrepr(task)
        template_headers: dict[str, Any] = self.options["headers"]
        headers = {**template_headers, "id": task_id, "argsrepr": argsrepr}
        if template_headers["root_id"] == template_headers["id"]:
            headers["root_id"] = task_id  # a task with no parent is its own root (else all share the parent's)
        # The queue was declared by the call's first (Celery-sent) message; kombu would only re-check its cache.
        options = {**self.options, "headers": headers, "correlation_id": task_id, "declare": []}
        if "argsrepr" in options:  # Celery copies the send options it does not know into the message properties
            options["argsrepr"] = argsrepr
        return ([task.to_message()], {}, *self.body[2:]), options


class _RecordingProducer:
    """Stands in for the producer during one send_task: forwards everything and keeps the publish arguments."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        self.template: _Template | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    def publish(self, body: Any, **options: Any) -> Any:
        """Publish as asked, remembering how."""
        self.template = _Template(tuple(body), dict(options))
        return self._producer.publish(body, **options)


def _argsrepr(task: ImageTask) -> str:
    # Celery would otherwise build a printable copy of every message's arguments (~10 % of the producer's CPU);
    # monitoring needs no more than the image's name.
    return f"[{task.job_id}:{task.index}]"


class TaskPublisher:
    """Sends ImageTask messages to one queue."""

    def __init__(self, app: Celery, queue: str) -> None:
        self._app = app
        self._queue = queue

    def __call__(self, tasks: list[ImageTask]) -> None:
        """Publish `tasks` over one producer; the transport sends each batch in one round trip."""
        if not tasks:
            return
        with self._app.producer_or_acquire() as producer, producer.batch(max_size=BATCH):
            template = self._send_first(producer, tasks[0])
            for task in tasks[1:]:
                body, options = template.message_for(task)
                producer.publish(body, **options)

    def _send_first(self, producer: Any, task: ImageTask) -> _Template:
        """Send `task` the ordinary Celery way and return the publish arguments Celery used."""
        recorder = _RecordingProducer(producer)
        self._app.send_task(
            TASK_NAME, args=[task.to_message()], queue=self._queue, producer=recorder,
            serializer="json", ignore_result=True, argsrepr=_argsrepr(task), kwargsrepr="{}",
        )
        if recorder.template is None:
            raise RuntimeError("Celery's send_task published nothing through the producer it was given")
        return recorder.template
