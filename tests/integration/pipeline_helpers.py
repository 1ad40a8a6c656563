"""Run blobscore's real processes for integration tests: workers and CLI commands with a given environment."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from shared_helpers import run_cli_json

from deploy.local.procs import ManagedProcess

REPO = Path(__file__).resolve().parents[2]


def blobscore_env(
    *, broker_url: str, connection_string: str, scoring_port: int, key: str, service_name: str,
    model: str = "resnet50", extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The BLOBSCORE_* environment of one test's worker and CLI: a queue of its own, real local services."""
    env = {key_: value for key_, value in os.environ.items() if not key_.startswith("BLOBSCORE_")}
    env.update({
        "BLOBSCORE_BROKER_URL": broker_url,
        "BLOBSCORE_QUEUE": f"test-{uuid.uuid4().hex[:8]}",
        "BLOBSCORE_BLOB_CONNECTION_STRING": connection_string,
        "BLOBSCORE_SCORING_ADDRESS": "127.0.0.1",
        "BLOBSCORE_SCORING_PORT": str(scoring_port),
        "BLOBSCORE_SCORING_KEY": key,
        "BLOBSCORE_SCORING_SERVICE_NAME": service_name,
        "BLOBSCORE_SCORING_MODEL": model,
        "BLOBSCORE_SERVICE": service_name,
        "BLOBSCORE_SCORING_TIMEOUT_S": "20",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def start_worker(env: dict[str, str], log: Path, concurrency: int = 4) -> ManagedProcess:
    """A real `python -m worker` (Celery, thread pool) process, once it reports ready."""
    process = ManagedProcess.start(
        [sys.executable, "-m", "worker"], log, env={**env, "BLOBSCORE_WORKER_CONCURRENCY": str(concurrency)},
        cwd=log.parent,
    )
    process.wait_for_log(r"ready\.", timeout=60)
    return process


def start_standin(workdir: Path, *args: str, key: str) -> tuple[ManagedProcess, int]:
    """A real stand-in scorer on a free port (key passed by environment, as in production); returns its port."""
    process = ManagedProcess.start(
        [sys.executable, "-m", "deploy.standin", "--port", "0", *args], workdir / "standin.log",
        env={**os.environ, "BLOBSCORE_STANDIN_KEY": key}, cwd=REPO,
    )
    match = process.wait_for_log(r"listening on [^\s]+:(\d+)", timeout=120)
    return process, int(match.group(1))




def wait_until_done(env: dict[str, str], cwd: Path, job_id: str, timeout: float = 180) -> dict[str, Any]:
    """Poll `status --json` until the job is done; fail with the last status after `timeout`."""
    deadline = time.monotonic() + timeout
    status = run_cli_json(env, cwd, "status", job_id)
    while status["state"] != "done":
        assert time.monotonic() < deadline, f"job did not finish: {status}"
        time.sleep(0.5)
        status = run_cli_json(env, cwd, "status", job_id)
    return status



def read_stats(path: Path) -> dict[str, Any]:
    """The stand-in's call accounting (`--stats-file`), or zero calls before the first one."""
    if not path.exists():
        return {"predict_calls": 0, "by_sha256": {}}
    stats: dict[str, Any] = json.loads(path.read_text())
    return stats
