"""`blobscore flower` (producer/flower_cli.py) on a real broker with a real worker: basic auth is required and
enforced, the worker is listed, and neither the broker's password nor Flower's is ever printed.

The broker is a private redis-server with a password (`requirepass`), so a leaked broker URL would show. The command
runs as `python -m producer.flower_cli` (its own entry point; `blobscore flower` once mounted on producer/cli.py).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pipeline_helpers import blobscore_env, start_standin, start_worker
from shared_helpers import settings_of

from deploy.local.procs import ManagedProcess, free_port
from deploy.local.redis_local import ensure_redis_server_binary, redis_answers

pytestmark = pytest.mark.integration

SERVICE = "flower-svc"
KEY = "flower-test-key"
BROKER_PASSWORD = f"broker-pw-{uuid.uuid4().hex[:12]}"
FLOWER_USER = "watcher"
FLOWER_PASSWORD = f"flower-pw-{uuid.uuid4().hex[:12]}"
WORKER_LISTED_TIMEOUT_S = 20.0


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own on a free port, behind a password; its URL (password included)."""
    port = free_port()
    workdir = tmp_path / "redis"
    workdir.mkdir()
    process = ManagedProcess.start(
        [ensure_redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir),
         "--save", "", "--appendonly", "no", "--requirepass", BROKER_PASSWORD],
        workdir / "redis.log", cwd=workdir,
    )
    url = f"redis://:{BROKER_PASSWORD}@127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 15
        while not redis_answers(url):
            assert process.alive(), f"redis-server exited:\n{process.log_tail()}"
            assert time.monotonic() < deadline, f"redis-server did not answer:\n{process.log_tail()}"
            time.sleep(0.05)
        yield url
    finally:
        process.stop()


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)  # noqa: S310 (our own Flower on loopback)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _listed_worker(base: str, pid: int) -> dict[str, Any]:
    """The entry of `GET /api/workers` whose stats are the worker process `pid`'s (retried: Flower inspects)."""
    deadline = time.monotonic() + WORKER_LISTED_TIMEOUT_S
    body = ""
    while time.monotonic() < deadline:
        status, body = _get(f"{base}/api/workers", (FLOWER_USER, FLOWER_PASSWORD))
        assert status == 200, body
        for info in json.loads(body).values():
            if info.get("stats", {}).get("pid") == pid:
                found: dict[str, Any] = info
                return found
        time.sleep(0.5)
    raise AssertionError(f"worker {pid} not listed by Flower within {WORKER_LISTED_TIMEOUT_S:g} s: {body[:2000]}")


def test_flower_requires_auth_and_lists_the_running_worker(tmp_path: Path, private_broker: str, azurite: Any) -> None:
    standin, scoring_port = start_standin(tmp_path, "--service-name", SERVICE, "--no-model", "--emulate-latency-ms",
                                          "5", key=KEY)
    env = blobscore_env(broker_url=private_broker, connection_string=azurite.connection_string,
                        scoring_port=scoring_port, key=KEY, service_name=SERVICE,
                        extra={"BLOBSCORE_WORKER_REMOTE_CONTROL": "true"})
    env.pop("BLOBSCORE_FLOWER_AUTH", None)
    started: list[ManagedProcess] = [standin]
    try:
        worker = start_worker(env, tmp_path / "worker.log", concurrency=2)
        started.append(worker)
        port = free_port()
        flower = ManagedProcess.start(
            [sys.executable, "-m", "producer.flower_cli", "--port", str(port),
             "--basic-auth", f"{FLOWER_USER}:{FLOWER_PASSWORD}"],
            tmp_path / "flower.log", env=env, cwd=tmp_path,
        )
        started.append(flower)
        flower.wait_for_port("127.0.0.1", port, timeout=60, what="blobscore flower")
        base = f"http://127.0.0.1:{port}"

        assert _get(f"{base}/api/workers")[0] == 401, "no credentials"
        assert _get(f"{base}/api/workers", (FLOWER_USER, "wrong-password"))[0] == 401, "a wrong password"
        assert _get(f"{base}/", None)[0] == 401, "the web UI too"

        info = _listed_worker(base, worker.pid)
        queues = {queue["name"] for queue in info.get("active_queues", [])}
        assert settings_of(env).queue_for(SERVICE) in queues, queues
        status, body = _get(f"{base}/api/workers?refresh=1", (FLOWER_USER, FLOWER_PASSWORD))
        assert status == 200
        assert BROKER_PASSWORD not in body, "the worker's broker URL must reach Flower masked"

        log = flower.log.read_text(errors="replace")
        assert f"127.0.0.1:{port}" in log, log
        assert "redis://:**@127.0.0.1" in log, "the broker, its password masked"
        assert "BLOBSCORE_WORKER_REMOTE_CONTROL=true" in log, "the note on what workers need to be seen"
    finally:
        for process in reversed(started):
            process.stop()
    log = flower.log.read_text(errors="replace")
    assert BROKER_PASSWORD not in log, log
    assert FLOWER_PASSWORD not in log, log
    assert flower.returncode == 0, f"SIGTERM is a clean stop:\n{log}"


@pytest.mark.parametrize(("args", "env_auth", "message"), [
    ((), None, "needs basic auth: set BLOBSCORE_FLOWER_AUTH=user:password"),
    (("--basic-auth", "no-colon-secret"), None, "--basic-auth must be user:password"),
    ((), "admin:", "BLOBSCORE_FLOWER_AUTH must be user:password"),
])
def test_flower_refuses_to_start_without_basic_auth(
    tmp_path: Path, args: tuple[str, ...], env_auth: str | None, message: str
) -> None:
    env = {name: value for name, value in blobscore_env(
        broker_url="redis://127.0.0.1:6379/9", connection_string="UseDevelopmentStorage=true", scoring_port=8500,
        key=KEY, service_name=SERVICE).items() if name != "BLOBSCORE_FLOWER_AUTH"}
    if env_auth is not None:
        env["BLOBSCORE_FLOWER_AUTH"] = env_auth
    done = subprocess.run([sys.executable, "-m", "producer.flower_cli", "--port", str(free_port()), *args], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), done.stderr
    assert message in lines[0], done.stderr
    assert "no-colon-secret" not in done.stderr
    assert done.stdout == ""
