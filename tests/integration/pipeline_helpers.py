"""Run blobscore's real processes for integration tests: workers and CLI commands with a given environment."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import harness
from harness import REPO, service_env
from shared_helpers import run_cli_json

from deploy.local.procs import ManagedProcess

__all__ = ["REPO", "blobscore_env", "read_stats", "start_standin", "start_worker", "wait_until_done"]


def blobscore_env(
    *, broker_url: str, connection_string: str, scoring_port: int, key: str, service_name: str,
    model: str = "resnet50", extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The BLOBSCORE_* environment of one test's worker and CLI (tests/harness.py), with a roomy scoring deadline:
    the real model on a busy machine."""
    return service_env(broker_url=broker_url, connection_string=connection_string, scoring_port=scoring_port,
                       key=key, service=service_name, model=model,
                       extra={"BLOBSCORE_SCORING_TIMEOUT_S": "20", **(extra or {})})


def start_worker(env: dict[str, str], log: Path, concurrency: int = 4) -> ManagedProcess:
    """A real `python -m worker` process, once it reports ready (tests/harness.py)."""
    return harness.start_worker(env, log, concurrency, timeout=60)


def start_standin(workdir: Path, *args: str, key: str) -> tuple[ManagedProcess, int]:
    """A real stand-in scorer on a free port; returns it and its port (tests/harness.py)."""
    return harness.start_standin(workdir, *args, key=key)




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
