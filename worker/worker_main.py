"""Start a Celery worker: settings built here, at the entry point, and handed down."""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery.signals import setup_logging

from worker import logs, metrics, probes
from worker.celery_app import create_app
from worker.errors import BlobscoreError, ConfigurationError
from worker.probes import Health
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
    """Celery worker arguments: a thread pool, so one process shares its channels and its Blob client.

    With JSON logs Celery's start-up banner (printed, not logged) is left out: every line is then one JSON object.
    """
    return [
        *(["--quiet"] if settings.log_format == "json" else []),  # celery's own option, before the sub-command
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        f"--queues={','.join(queues)}",
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def _logging_is_ours(**_: Any) -> None:
    """Celery's setup_logging signal: a receiver means Celery leaves the handlers and levels configured here alone
    (it would otherwise add its own handler, in its own format, to its task logger)."""


def serve_metrics(settings: Settings, queues: list[str], concurrency: int | None = None) -> None:
    """Start this process's metrics and probes server when a port is configured (one per process)."""
    threads = concurrency or settings.worker_concurrency
    metrics.CONCURRENCY.set(threads)
    if settings.metrics_port is None:
        return
    health = Health(settings.broker_url, queues, threads)
    health.connect()
    port = probes.serve(settings.metrics_port, settings.metrics_host, health)
    log.info("metrics at http://%s:%d/metrics, probes at /healthz and /readyz", settings.metrics_host, port)


def run_worker(
    settings: Settings, region: str | None = None, services: list[str] | None = None, concurrency: int | None = None
) -> None:
    """Run the worker in this process until it is told to stop."""
    # One line per image outcome and per retry (worker/tasks.py); azure-core's line per request and Celery's two per
    # task stay off (worker/logs.py NOISY_LOGGERS). BLOBSCORE_LOG_FORMAT=json: one JSON object per line.
    logs.configure(settings.log_level, settings.log_format)
    setup_logging.connect(_logging_is_ours, weak=False)
    names = services_to_consume(settings, region, services)
    check_services(settings, names)
    # Every worker also takes its deployment's listing steps: the fleet carries each job's listing
    # (producer/carrier.py). This entry point composes the worker process, as the CLI composes commands.
    from producer.carrier import listing_queue, register_carrier

    queues = [settings.queue_for(name) for name in names] + [listing_queue(settings)]
    serve_metrics(settings, queues, concurrency)
    app = create_app(settings, consumes=queues)
    register_carrier(app, settings)
    app.worker_main(worker_argv(settings, queues, concurrency))


def main() -> None:
    """Entry point of `python -m worker`: a configuration mistake is one line and exit code 2, not a traceback."""
    try:
        run_worker(load_settings())
    except BlobscoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
