"""The one harness for real processes: a stand-in scorer, a worker, and the BLOBSCORE_* environment of a test.

The integration suite (tests/integration/pipeline_helpers.py), the fault suite (tests/faults/fault_helpers.py) and
the benchmarks (bench/) all start their processes through these, so a change to how the stand-in or a worker is
started is made once.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from deploy.local.procs import ManagedProcess

REPO = Path(__file__).resolve().parents[1]
LISTENING = r"listening on [^\s]+:(\d+)"
STANDIN_START_TIMEOUT_S = 120.0  # a cold start of the real model builds it first
WORKER_READY_TIMEOUT_S = 90.0


def service_env(
    *, broker_url: str, connection_string: str, scoring_port: int, key: str, service: str, model: str = "resnet50",
    queue_prefix: str = "test", extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """This process's environment without any BLOBSCORE_* of its own, plus one test's: a queue base of its own (so
    nothing of another test is consumed), real local services, the stand-in's key and route."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("BLOBSCORE_")}
    env.update({
        "BLOBSCORE_BROKER_URL": broker_url,
        "BLOBSCORE_QUEUE": f"{queue_prefix}-{uuid.uuid4().hex[:8]}",
        "BLOBSCORE_BLOB_CONNECTION_STRING": connection_string,
        "BLOBSCORE_SCORING_ADDRESS": "127.0.0.1",
        "BLOBSCORE_SCORING_PORT": str(scoring_port),
        "BLOBSCORE_SCORING_KEY": key,
        "BLOBSCORE_SCORING_SERVICE_NAME": service,
        "BLOBSCORE_SCORING_MODEL": model,
        "BLOBSCORE_SERVICE": service,
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def start_standin(
    workdir: Path, *args: str, key: str, port: int = 0, log_name: str = "standin.log",
    env: dict[str, str] | None = None,
) -> tuple[ManagedProcess, int]:
    """A real `python -m deploy.standin --port PORT ARGS` (the key by environment, as in production), once it
    listens; returns it and its port."""
    process = ManagedProcess.start(
        [sys.executable, "-m", "deploy.standin", "--port", str(port), *args], workdir / log_name,
        env={**(env if env is not None else os.environ), "BLOBSCORE_STANDIN_KEY": key}, cwd=REPO,
    )
    match = process.wait_for_log(LISTENING, timeout=STANDIN_START_TIMEOUT_S)
    return process, int(match.group(1))


def start_worker(
    env: dict[str, str], log: Path, concurrency: int = 4, extra: dict[str, str] | None = None,
    timeout: float = WORKER_READY_TIMEOUT_S,
) -> ManagedProcess:
    """A real `python -m worker` (Celery, thread pool), once it says it is ready."""
    process = ManagedProcess.start(
        [sys.executable, "-m", "worker"], log,
        env={**env, **(extra or {}), "BLOBSCORE_WORKER_CONCURRENCY": str(concurrency)}, cwd=log.parent,
    )
    process.wait_for_log(r"ready\.", timeout=timeout)
    return process
