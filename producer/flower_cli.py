"""`blobscore flower`: Flower (from PyPI, the `flower` extra) on this deployment's broker, behind HTTP basic auth.

Flower runs in this process on a Celery app built from the settings (worker/celery_app.py `publisher_app`), so it
needs no `--broker` option and never prints the broker URL with its password. Basic auth is required: `--basic-auth
USER:PASSWORD` or BLOBSCORE_FLOWER_AUTH, read here at the entry point (the variable keeps the password out of `ps`).

What Flower can show depends on the workers:

* its worker list (`/api/workers`, the Workers tab's details) comes from Celery's remote control (`inspect stats`,
  `active_queues`, `registered`, `conf`): workers must run with BLOBSCORE_WORKER_REMOTE_CONTROL=true;
* its task list, the dashboard's counters and the workers' online status come from events. Workers send task
  events only when Celery's `worker_send_task_events` is on (`celery worker -E`). Flower's periodic `enable_events`
  broadcast cannot turn them on in our workers: started without `-E`, gossip or heartbeat, they have no event
  dispatcher at all and answer "event dispatcher unavailable" (README.md "Watching the fleet",
  bench/flower_events_cost.py).

    blobscore flower --port 5555 --address 127.0.0.1          # with BLOBSCORE_FLOWER_AUTH=admin:<password>
    python -m producer.flower_cli --port 5555 --basic-auth admin:<password>
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from types import FrameType
from typing import Annotated, Any

import typer
from kombu.utils.url import maybe_sanitize_url

from worker import logs
from worker.errors import BlobscoreError, ConfigurationError
from worker.settings import Settings, load_settings

flower_app = typer.Typer()
log = logging.getLogger("producer.flower")

AUTH_ENV = "BLOBSCORE_FLOWER_AUTH"
EXIT_USAGE = 2
# After this long, say so when no worker answered Flower's first `inspect` (remote control off, or no worker).
WORKER_CHECK_DELAY_S = 5.0
WORKERS_NOTE = (
    "workers are seen only with BLOBSCORE_WORKER_REMOTE_CONTROL=true (the worker list, /api/workers) and with task "
    "events on (the tasks, the dashboard: Celery's worker_send_task_events, `celery worker -E`)"
)


def basic_auth_from(option: str | None, environ: Mapping[str, str]) -> str:
    """The `user:password` Flower checks, from --basic-auth or else BLOBSCORE_FLOWER_AUTH; never echoed back.

    Missing, or not `user:password` with both parts non-empty: a ConfigurationError naming where to set it.
    """
    source, value = ("--basic-auth", option) if option is not None else (AUTH_ENV, environ.get(AUTH_ENV))
    if not value:
        raise ConfigurationError(
            f"blobscore flower needs basic auth: set {AUTH_ENV}=user:password (or pass --basic-auth user:password)"
        )
    user, colon, password = value.partition(":")
    if not colon or not user.strip() or not password or any(char in value for char in "\r\n"):
        raise ConfigurationError(f"{source} must be user:password, both non-empty, on one line (value not shown)")
    return value


def shown_broker(url: str) -> str:
    """The broker URL as it may be printed: any password replaced by `**`."""
    return str(maybe_sanitize_url(url))


def _import_flower() -> tuple[Any, Any, dict[str, Any]]:
    try:
        from flower.app import Flower  # type: ignore[import-untyped]
        from flower.options import default_options  # type: ignore[import-untyped]
        from flower.urls import settings as web_settings  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ConfigurationError(
            f"Flower is not installed ({exc.name or exc}): pip install 'blobscore[flower]'"
        ) from None
    return Flower, default_options, web_settings


def _check_broker(settings: Settings) -> None:
    from worker.redis_client import open_redis

    client = open_redis(settings.broker_url, timeout_s=5)
    try:
        client.ping()
    except Exception as exc:
        raise ConfigurationError(
            f"cannot reach the broker at {shown_broker(settings.broker_url)} ({type(exc).__name__}): check "
            "BLOBSCORE_BROKER_URL"
        ) from None
    finally:
        client.close()


def run_flower(settings: Settings, credentials: str, port: int, address: str, enable_events: bool) -> None:
    """Serve Flower until SIGTERM or Ctrl-C: Flower's options set here, never from flowerconfig.py or FLOWER_*."""
    flower_class, options, web_settings = _import_flower()
    from worker.celery_app import publisher_app

    _check_broker(settings)
    options.port, options.address = port, address
    options.basic_auth = [credentials]  # checked by Flower with hmac.compare_digest; never logged
    options.enable_events = enable_events
    options.auth = ""  # no OAuth: basic auth only
    # Flower's own command silences tornado's access log outside debug mode; so do we (one line per request).
    access = logging.getLogger("tornado.access")
    access.addHandler(logging.NullHandler())
    access.propagate = False
    flower = flower_class(capp=publisher_app(settings), options=options, **web_settings)
    bound = flower.start_http_server()
    log.info("flower at http://%s:%d/ (basic auth) on broker %s, namespace %s", address or "0.0.0.0", bound,
             shown_broker(settings.broker_url), settings.namespace_in_use)
    log.info("flower: %s", WORKERS_NOTE)
    if not settings.worker_remote_control:
        log.warning("flower: BLOBSCORE_WORKER_REMOTE_CONTROL is off in these settings; workers started with the "
                    "same settings do not answer remote control and are not listed")

    def _workers_seen() -> None:
        if not flower.inspector.workers:
            log.warning("flower: no worker answered remote control yet (%s)", WORKERS_NOTE)

    flower.io_loop.call_later(WORKER_CHECK_DELAY_S, _workers_seen)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("flower stopping (%s)", signal.Signals(signum).name)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        flower.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        with contextlib.suppress(Exception):
            flower.stop()


@flower_app.command("flower")
def flower(
    port: Annotated[int, typer.Option(min=0, max=65535, help="Serve Flower on this port (0: any free one).")] = 5555,
    address: Annotated[str, typer.Option(
        help="The address to listen on; 0.0.0.0 for every interface (basic auth is plain HTTP: put TLS in front).",
    )] = "127.0.0.1",
    basic_auth: Annotated[str | None, typer.Option(
        "--basic-auth", metavar="USER:PASSWORD", show_default=False,
        help=f"Required, unless {AUTH_ENV} is set (better: a command line is visible to every user of the host).",
    )] = None,
    enable_events: Annotated[bool, typer.Option(
        "--enable-events/--no-enable-events",
        help="Broadcast Celery's enable_events every 5 s, as Flower does by default (only a worker that has an event "
        "dispatcher can act on it; ours answer 'event dispatcher unavailable' unless task events are on).",
    )] = True,
) -> None:
    """Run Flower, Celery's web monitor, on this deployment's broker, behind HTTP basic auth.

    Workers are seen only with BLOBSCORE_WORKER_REMOTE_CONTROL=true (the worker list) and with task events on (the
    tasks and the dashboard). Flower sees every worker and event on this broker, other deployments' included.
    """
    try:
        credentials = basic_auth_from(basic_auth, os.environ)
        settings = load_settings()
        logs.configure(settings.log_level, settings.log_format)
        run_flower(settings, credentials, port, address, enable_events)
    except BlobscoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


if __name__ == "__main__":
    flower_app(prog_name="blobscore flower")
