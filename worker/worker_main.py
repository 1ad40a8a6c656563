"""Start a Celery worker: settings built here, at the entry point, and handed down."""

from __future__ import annotations

import logging
import sys

from worker.celery_app import create_app
from worker.errors import BlobscoreError, ConfigurationError
from worker.scoring import Scorer
from worker.services import services_in_region
from worker.settings import Settings, load_settings

log = logging.getLogger("worker.start")


def services_to_consume(settings: Settings, region: str | None = None, services: list[str] | None = None) -> list[str]:
    """The given services, or every service in `region`, or every known service."""
    known = settings.all_services()
    if services:
        return [settings.service_config(name).name for name in services]
    if region:
        names = services_in_region(known, region)
        if not names:
            raise ConfigurationError(f"no service in region {region!r}")
        return names
    return sorted(known)


def queues_to_consume(settings: Settings, region: str | None = None, services: list[str] | None = None) -> list[str]:
    """The queues of the given services, or of every service in `region`, or of every known service."""
    return [settings.queue_for(name) for name in services_to_consume(settings, region, services)]


def check_services(settings: Settings, names: list[str]) -> None:
    """Reach each service with its key and route before consuming anything.

    A refused key or route is a ConfigurationError naming the service and the setting: the worker does not start,
    since every image would only wait. An unreachable service is a warning: outages pass, and the tasks wait in
    their queue (and in the retry policy) until it is back.
    """
    for name in names:
        scorer = Scorer.for_service(settings.service_config(name), settings)
        try:
            log.info("scoring service %s: %s", name, scorer.check())
        except ConfigurationError:
            raise
        except BlobscoreError as exc:
            log.warning("scoring service %s is not reachable now (%s); starting anyway: its images wait", name, exc)
        finally:
            scorer.close()


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
    names = services_to_consume(settings, region, services)
    check_services(settings, names)
    queues = [settings.queue_for(name) for name in names]
    app = create_app(settings, consumes=queues)
    app.worker_main(worker_argv(settings, queues, concurrency))


def main() -> None:
    """Entry point of `python -m worker`: a configuration mistake is one line and exit code 2, not a traceback."""
    try:
        run_worker(load_settings())
    except BlobscoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
