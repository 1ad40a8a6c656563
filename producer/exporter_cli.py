"""`blobscore exporter --port P`: the fleet's Prometheus metrics (producer/exporter.py)."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Annotated

import typer

from worker import logs
from worker.settings import load_settings

exporter_app = typer.Typer()
log = logging.getLogger("producer.exporter")


@exporter_app.command("exporter")
def exporter(
    port: Annotated[int, typer.Option(min=0, max=65535, help="Serve /metrics on this port (0: any free one).")] = 9108,
    host: Annotated[str, typer.Option(help="The address to listen on.")] = "0.0.0.0",
) -> None:
    """Serve what no single worker knows for Prometheus: queue depths, running jobs and their windows, schedules,
    and which queues a live worker consumes — read from Redis on every scrape. One per deployment is enough."""
    from producer.exporter import serve

    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    bound = serve(settings, port, host)
    log.info("exporter listening on %s:%d (namespace %s)", host, bound, settings.namespace_in_use)
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("exporter stopping (%s)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stop.wait()
