"""Health probes a supervisor can act on, served with the metrics: /readyz (can take work) and /healthz (is taking it).

Readiness: the worker has started consuming and its broker answers. Liveness means more than "the process is
alive": it fails when the worker has stopped taking tasks although its queues hold work and it has free threads —
the stuck consumer a restart cures. A broker outage fails readiness only: restarting workers would not bring Redis
back, and they reconnect by themselves.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
from celery.signals import task_postrun, task_prerun, worker_ready
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker import metrics
from worker.errors import ConfigurationError
from worker.redis_client import open_redis

log = logging.getLogger(__name__)

# No task started for this long while a queue has work and a thread is free: the consumer is stuck. Longer than a
# retry's longest countdown wait in the broker would not matter here (those messages are not in the queue list).
STALL_S = 60.0
PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Verdict:
    """A probe's answer: healthy or not, and why (the body of the HTTP reply)."""

    ok: bool
    reason: str


def liveness(ready: bool, busy: int, concurrency: int, queued: int | None, idle_s: float) -> Verdict:
    """Pure: is the worker taking work? (`queued` None: the broker did not answer, so nothing can be concluded.)"""
    if not ready:
        return Verdict(True, "starting")
    if queued is None:
        return Verdict(True, "broker unreachable: readiness says so; a restart would not help")
    if queued == 0 or busy >= concurrency:
        return Verdict(True, f"{busy}/{concurrency} threads busy, {queued} queued")
    if idle_s > STALL_S:
        return Verdict(False, f"stuck: {queued} tasks queued, {concurrency - busy} threads free, no task started "
                              f"for {idle_s:.0f} s")
    return Verdict(True, f"{busy}/{concurrency} threads busy, {queued} queued, last start {idle_s:.0f} s ago")


class Health:
    """What the probes look at: readiness, threads in use and the last task start (kept by Celery's signals)."""

    def __init__(self, broker_url: str, queues: list[str], concurrency: int) -> None:
        self._broker = open_redis(broker_url, timeout_s=PROBE_TIMEOUT_S)
        self._queues, self._concurrency = queues, concurrency
        self._ready = False
        self._busy = 0
        self._last_start = time.monotonic()
        self._lock = threading.Lock()

    def connect(self) -> None:
        """Follow the worker through Celery's signals (kept connected for the process's life)."""
        worker_ready.connect(self._on_ready, weak=False)
        task_prerun.connect(self._on_start, weak=False)
        task_postrun.connect(self._on_end, weak=False)

    def _on_ready(self, **_: Any) -> None:
        self._ready = True
        self._last_start = time.monotonic()

    def _on_start(self, **_: Any) -> None:
        with self._lock:
            self._busy += 1
            self._last_start = time.monotonic()

    def _on_end(self, **_: Any) -> None:
        with self._lock:
            self._busy = max(self._busy - 1, 0)

    def readiness(self) -> Verdict:
        """Consuming, and the broker answers."""
        if not self._ready:
            return Verdict(False, "starting")
        try:
            self._broker.ping()
        except redis.RedisError as exc:
            return Verdict(False, f"broker unreachable: {type(exc).__name__}")
        return Verdict(True, "ready")

    def liveness(self) -> Verdict:
        """Taking work when there is work and room (see `liveness`)."""
        try:
            queued: int | None = sum(int(self._broker.llen(queue)) for queue in self._queues)
        except redis.RedisError:
            queued = None
        with self._lock:
            busy, idle_s = self._busy, time.monotonic() - self._last_start
        return liveness(self._ready, busy, self._concurrency, queued, idle_s)


def serve(port: int, host: str, health: Health | None) -> int:
    """Serve /metrics, /healthz and /readyz from a daemon thread; the port bound."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                self._reply(200, generate_latest(metrics.REGISTRY), CONTENT_TYPE_LATEST)
            elif self.path.startswith(("/healthz", "/readyz")) and health is not None:
                verdict = health.liveness() if self.path.startswith("/healthz") else health.readiness()
                self._reply(200 if verdict.ok else 503, f"{verdict.reason}\n".encode(), "text/plain; charset=utf-8")
            else:
                self._reply(404, b"not found\n", "text/plain")

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            return  # a probe every few seconds is not worth a log line

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): set BLOBSCORE_METRICS_PORT "
            "(or --metrics-port) to a free port"
        ) from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="blobscore-probes", daemon=True).start()
    return int(server.server_port)
