"""A wrong key, a rotated key and a missing worker are named at once (real Redis, Azurite, stand-in, worker)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import harness
import pytest
from azure.storage.blob import BlobServiceClient
from pipeline_helpers import blobscore_env, start_worker
from shared_helpers import jpeg_bytes, run_cli_json

from deploy.local.azurite import AZURITE_KEY, connection_string
from deploy.local.procs import ManagedProcess, free_port

pytestmark = pytest.mark.integration

SERVICE = "keys"


def _standin(workdir: Path, port: int, key: str, tag: str) -> ManagedProcess:
    process, _ = harness.start_standin(workdir, "--service-name", SERVICE, "--no-model", "--emulate-latency-ms", "5",
                                       key=key, port=port, log_name=f"{tag}.log")
    return process


def _status(env: dict[str, str], cwd: Path, job_id: str) -> dict[str, Any]:
    return run_cli_json(env, cwd, "status", job_id)


def _wait_for_problem(env: dict[str, str], cwd: Path, job_id: str, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        problems = _status(env, cwd, job_id).get("problems", [])
        found = [line for line in problems if text in line]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"status never said {text!r}: {problems}"
        time.sleep(0.5)


def test_a_worker_with_a_wrong_key_refuses_to_start_naming_the_setting(
    tmp_path: Path, redis_url: str, azurite: Any
) -> None:
    port = free_port()
    standin = _standin(tmp_path, port, "the-right-key", "standin")
    env = blobscore_env(broker_url=redis_url, connection_string=azurite.connection_string, scoring_port=port,
                        key="a-wrong-key", service_name=SERVICE)
    try:
        completed = subprocess.run([sys.executable, "-m", "worker"], env=env, cwd=tmp_path, capture_output=True,
                                   text=True, timeout=60, check=False)
    finally:
        standin.stop()
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    error = completed.stderr.strip().splitlines()[-1]
    assert error.startswith("error: scoring service keys")
    assert "rejects the key (UNAUTHENTICATED" in error
    assert "check BLOBSCORE_SCORING_KEY" in error
    assert "a-wrong-key" not in completed.stderr
    assert "the-right-key" not in completed.stderr


def test_a_rotated_key_and_a_missing_worker_show_in_status(
    tmp_path: Path, redis_url: str, azurite: Any, blob_service: BlobServiceClient
) -> None:
    container = f"keys-{uuid.uuid4().hex[:10]}"
    client = blob_service.create_container(container)
    for number in range(2):
        client.upload_blob(f"img-{number}.jpg", jpeg_bytes(700 + number))
    port = free_port()
    standin = _standin(tmp_path, port, "old-key", "standin-old")
    env = blobscore_env(broker_url=redis_url, connection_string=azurite.connection_string, scoring_port=port,
                        key="old-key", service_name=SERVICE)
    # No worker yet: status says so instead of waiting in silence.
    job = run_cli_json(env, tmp_path, "enqueue", "--container", container)["job_id"]
    line = _wait_for_problem(env, tmp_path, job, "nothing is carrying the listing")
    assert "blobscore worker" in line
    assert _status(env, tmp_path, job)["state"] == "listing"
    worker = start_worker(env, tmp_path / "worker.log", concurrency=2)
    try:
        assert _wait_until(lambda: _status(env, tmp_path, job)["state"] == "done", 30)
        # The service's key is rotated under a running worker: the next job's images wait, and status says why.
        standin.stop()
        standin = _standin(tmp_path, port, "new-key", "standin-new")
        for number in range(2, 4):
            client.upload_blob(f"img-{number}.jpg", jpeg_bytes(700 + number))
        second = run_cli_json(env, tmp_path, "enqueue", "--container", container)["job_id"]
        line = _wait_for_problem(env, tmp_path, second, "rejects the key")
        assert "scoring service keys" in line
        assert "UNAUTHENTICATED" in line
        assert "check BLOBSCORE_SCORING_KEY" in line
        assert "new-key" not in line
        assert "old-key" not in line
        status = _status(env, tmp_path, second)
        assert status["ok"] == 0
        assert status["rejected"] == 0, "a configuration error must never reject images"
    finally:
        worker.stop()
        standin.stop()


def test_enqueue_of_an_empty_prefix_says_so_at_once(
    tmp_path: Path, redis_url: str, azurite: Any, blob_service: BlobServiceClient
) -> None:
    container = f"empty-{uuid.uuid4().hex[:10]}"
    blob_service.create_container(container).upload_blob("photos/img-0.jpg", jpeg_bytes(5))
    env = blobscore_env(broker_url=redis_url, connection_string=azurite.connection_string, scoring_port=free_port(),
                        key="k", service_name=SERVICE)

    def enqueue(prefix: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "producer.cli", "enqueue", "--container", container,
                               "--prefix", prefix, "--json"], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, check=False)

    mistyped = enqueue("fotos/")
    assert mistyped.returncode == 0  # a job that ends at once is not an error: the note says what to check
    assert f"nothing to score: no blob under {container}/fotos/ (check --prefix)" in mistyped.stderr
    right = enqueue("photos/")
    assert right.returncode == 0
    assert "nothing to score" not in right.stderr


def test_enqueue_against_a_blob_endpoint_that_never_answers_names_it_within_seconds(
    tmp_path: Path, redis_url: str
) -> None:
    silent = socket.socket()  # the kernel completes the handshake; nothing ever reads or answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    env = blobscore_env(broker_url=redis_url, connection_string=connection_string(port), scoring_port=free_port(),
                        key="k", service_name=SERVICE)
    try:
        started = time.monotonic()
        completed = subprocess.run([sys.executable, "-m", "producer.cli", "enqueue", "--container", "photos"],
                                   env=env, cwd=tmp_path, capture_output=True, text=True, timeout=90, check=False)
        took_s = time.monotonic() - started
    finally:
        silent.close()
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr  # one line, no traceback
    assert f"look for container photos at 127.0.0.1:{port}: Blob Storage unreachable" in lines[0]
    assert "check BLOBSCORE_BLOB_CONNECTION_STRING" in lines[0]
    assert AZURITE_KEY not in completed.stderr
    print(f"an endpoint that never answers was named after {took_s:.1f} s")  # the figure in the README


def _wait_until(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_score_exit_codes(tmp_path: Path, redis_url: str, azurite: Any) -> None:
    port = free_port()
    standin = _standin(tmp_path, port, "score-key", "standin")
    env = blobscore_env(broker_url=redis_url, connection_string=azurite.connection_string, scoring_port=port,
                        key="score-key", service_name=SERVICE)
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_bytes(1))
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")

    def score(*files: Path) -> int:
        return subprocess.run([sys.executable, "-m", "producer.cli", "score", *map(str, files), "--json"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False).returncode

    def score_at(key_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        # A service given on the command line, its key read from the variable --key-env names.
        argv = [sys.executable, "-m", "producer.cli", "score", str(good), "--address", f"127.0.0.1:{port}",
                "--model", "resnet50", "--service-name", SERVICE, "--key-env", "MY_SCORING_KEY", "--json"]
        return subprocess.run(argv, env={**env, **key_env}, cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, check=False)

    try:
        assert score(good) == 0
        assert score(good, text) == 1
        assert score(good, tmp_path / "missing.jpg") == 1
        assert score_at({"MY_SCORING_KEY": "score-key"}).returncode == 0
        unset = score_at({})
        assert unset.returncode == 2
        assert "MY_SCORING_KEY is not set" in unset.stderr
    finally:
        standin.stop()
