"""The worker's probes on real processes: ready once consuming, not ready while its broker is gone, alive meanwhile."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pipeline_helpers import blobscore_env, start_standin, start_worker

from deploy.local.procs import free_port
from deploy.local.redis_local import start_redis

pytestmark = pytest.mark.integration


def probe(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_for_probe(port: int, path: str, code: int, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        got, body = probe(port, path)
        if got == code:
            return body
        assert time.monotonic() < deadline, f"{path} answered {got} ({body.strip()}), not {code}"
        time.sleep(0.3)


@pytest.mark.timeout(120)
def test_readiness_follows_the_broker_and_liveness_does_not(tmp_path: Path, azurite: Any) -> None:
    redis_port, metrics_port = free_port(), free_port()
    broker = start_redis(redis_port, tmp_path / "redis")
    standin, scoring_port = start_standin(tmp_path, "--no-model", "--emulate-latency-ms", "5", key="probe-key")
    env = blobscore_env(broker_url=f"redis://127.0.0.1:{redis_port}/0", connection_string=azurite.connection_string,
                        scoring_port=scoring_port, key="probe-key", service_name="probes",
                        extra={"BLOBSCORE_METRICS_PORT": str(metrics_port)})
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        assert wait_for_probe(metrics_port, "/readyz", 200).strip() == "ready"
        assert probe(metrics_port, "/healthz")[0] == 200
        assert "blobscore_worker_concurrency" in probe(metrics_port, "/metrics")[1]
        broker.kill()  # the worker's broker connection is gone
        assert "broker unreachable" in wait_for_probe(metrics_port, "/readyz", 503)
        status, body = probe(metrics_port, "/healthz")
        assert status == 200, body  # restarting the worker would not bring Redis back
        broker = start_redis(redis_port, tmp_path / "redis")
        wait_for_probe(metrics_port, "/readyz", 200, timeout=40)
    finally:
        worker.stop()
        standin.stop()
        broker.kill()
