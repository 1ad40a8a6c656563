"""Start a Celery worker: settings built here, at the entry point, and handed down."""

from __future__ import annotations

import logging

from worker.celery_app import create_app
from worker.errors import ConfigurationError
from worker.services import services_in_region
from worker.settings import Settings, load_settings


def queues_to_consume(settings: Settings, region: str | None = None, services: list[str] | None = None) -> list[str]:
    """The queues of the given services, or of every service in `region`, or of every known service."""
    known = settings.all_services()
    if services:
        names = [settings.service_config(name).name for name in services]
    elif region:
        names = services_in_region(known, region)
        if not names:
            raise ConfigurationError(f"no service in region {region!r}")
    else:
        names = sorted(known)
    return [settings.queue_for(name) for name in names]


def worker_argv(settings: Settings, queues: list[str], concurrency: int | None = None) -> list[str]:
    """Celery worker arguments: a thread pool, so one process shares its channels and its Blob client."""
    return [
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        f"--queues={','.join(queues)}",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def run_worker(
    settings: Settings, region: str | None = None, services: list[str] | None = None, concurrency: int | None = None
) -> None:
    """Run the worker in this process until it is told to stop."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # azure-core logs every request and its headers at INFO, Celery two lines per task: at millions of images
    # that is most of the log and a share of the CPU. Failures, retries and rejections are still logged.
    for noisy in ("azure", "celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    queues = queues_to_consume(settings, region, services)
    app = create_app(settings)
    app.worker_main(worker_argv(settings, queues, concurrency))


def main() -> None:
    """Entry point of `python -m worker`."""
    run_worker(load_settings())
