"""Start a Celery worker: settings built here, at the entry point, and handed down."""

from __future__ import annotations

import logging

from worker.celery_app import create_app
from worker.settings import Settings, load_settings


def worker_argv(settings: Settings, queues: list[str] | None = None, concurrency: int | None = None) -> list[str]:
    """Celery worker arguments: a thread pool, so one process shares one channel and one Blob client."""
    return [
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        f"--queues={','.join(queues or [settings.queue])}",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def run_worker(settings: Settings, queues: list[str] | None = None, concurrency: int | None = None) -> None:
    """Run the worker in this process until it is told to stop."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # azure-core logs every request and its headers at INFO; keep worker logs about images.
    logging.getLogger("azure").setLevel(logging.WARNING)
    app = create_app(settings)
    app.worker_main(worker_argv(settings, queues, concurrency))


def main() -> None:
    """Entry point of `python -m worker`."""
    run_worker(load_settings())
