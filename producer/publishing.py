"""Publish image tasks to the broker over one pooled connection (kombu producer), JSON only."""

from __future__ import annotations

from celery import Celery

from worker.contracts import TASK_NAME, ImageTask


class TaskPublisher:
    """Sends ImageTask messages to a queue."""

    def __init__(self, app: Celery, queue: str) -> None:
        self._app = app
        self._queue = queue

    def __call__(self, tasks: list[ImageTask]) -> None:
        """Publish `tasks`, reusing one producer (and its connection) for the whole batch."""
        with self._app.producer_or_acquire() as producer:
            for task in tasks:
                self._app.send_task(
                    TASK_NAME, args=[task.to_message()], queue=self._queue, producer=producer,
                    serializer="json", ignore_result=True,
                )
