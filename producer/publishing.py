"""Publish image tasks to the broker in batches (kombu's batch publishing: one Redis pipeline a batch), JSON only."""

from __future__ import annotations

from celery import Celery

from worker.contracts import TASK_NAME, ImageTask

BATCH = 1000


class TaskPublisher:
    """Sends ImageTask messages to one queue."""

    def __init__(self, app: Celery, queue: str) -> None:
        self._app = app
        self._queue = queue

    def __call__(self, tasks: list[ImageTask]) -> None:
        """Publish `tasks` over one producer; the transport sends each batch in one round trip."""
        with self._app.producer_or_acquire() as producer, producer.batch(max_size=BATCH):
            for task in tasks:
                self._app.send_task(
                    TASK_NAME, args=[task.to_message()], queue=self._queue, producer=producer,
                    serializer="json", ignore_result=True,
                    # Celery would otherwise build a printable copy of every message's arguments (~10 % of
                    # the producer's CPU); monitoring needs no more than the image's name.
                    argsrepr=f"[{task.job_id}:{task.index}]", kwargsrepr="{}",
                )
