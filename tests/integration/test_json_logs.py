"""Every log line of a worker at DEBUG with BLOBSCORE_LOG_FORMAT=json is one JSON object, carries the image's facts,
and names no secret — through a rejection and a key rotated under the running worker (real stack, real worker)."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from pipeline_helpers import REPO, blobscore_env, start_worker, wait_until_done
from shared_helpers import jpeg_bytes, run_cli_json

from deploy.local.procs import ManagedProcess, free_port

pytestmark = pytest.mark.integration

SERVICE = "jsonlogs"
OLD_KEY = "json-logs-old-key-7f3a"
NEW_KEY = "json-logs-new-key-c41d"
# Azurite's well-known development account key: what BLOBSCORE_BLOB_CONNECTION_STRING carries here.
AZURITE_ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _standin(workdir: Path, port: int, key: str, tag: str) -> ManagedProcess:
    process = ManagedProcess.start(
        [sys.executable, "-m", "deploy.standin", "--port", str(port), "--service-name", SERVICE, "--no-model",
         "--emulate-latency-ms", "5"], workdir / f"{tag}.log", env={**os.environ, "BLOBSCORE_STANDIN_KEY": key},
        cwd=REPO,
    )
    process.wait_for_log(r"listening on [^\s]+:(\d+)", timeout=120)
    return process


def _lines(log: Path) -> list[dict[str, Any]]:
    """Every line of the worker's output, each parsed as one JSON object (fails on the first that is not)."""
    parsed = []
    for number, line in enumerate(log.read_text("utf-8").splitlines(), 1):
        try:
            document = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"line {number} of {log.name} is not JSON: {line!r}", pytrace=False)
        assert isinstance(document, dict), line
        assert {"ts", "level", "logger", "message"} <= set(document), line
        parsed.append(document)
    return parsed


def _wait_for_line(log: Path, wanted: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for line in _lines(log):
            if wanted.items() <= line.items():
                return line
        assert time.monotonic() < deadline, f"no log line with {wanted}"
        time.sleep(0.5)


def test_every_line_is_json_with_the_images_facts_and_no_secret(
    tmp_path: Path, redis_url: str, azurite: Any, blob_service: BlobServiceClient
) -> None:
    container = f"jsonlogs-{uuid.uuid4().hex[:10]}"
    client = blob_service.create_container(container)
    for index in range(3):
        client.upload_blob(f"img-{index}.jpg", jpeg_bytes(300 + index))
    client.upload_blob("bad/notes.jpg", b"a text file with a .jpg name\n")
    port = free_port()
    standin = _standin(tmp_path, port, OLD_KEY, "standin-old")
    env = blobscore_env(broker_url=redis_url, connection_string=azurite.connection_string, scoring_port=port,
                        key=OLD_KEY, service_name=SERVICE,
                        extra={"BLOBSCORE_LOG_FORMAT": "json", "BLOBSCORE_LOG_LEVEL": "DEBUG"})
    log = tmp_path / "worker.log"
    worker = start_worker(env, log, concurrency=2)
    try:
        first = run_cli_json(env, tmp_path, "enqueue", "--container", container)["job_id"]
        assert wait_until_done(env, tmp_path, first)["rejected"] == 1
        # The key is rotated under the running worker: the next job's images are retried, never rejected.
        standin.stop()
        standin = _standin(tmp_path, port, NEW_KEY, "standin-new")
        client.upload_blob("img-new.jpg", jpeg_bytes(399))
        second = run_cli_json(env, tmp_path, "enqueue", "--container", container)["job_id"]
        retry = _wait_for_line(log, {"event": "retry", "job_id": second, "reason": "UNAUTHENTICATED"})
        lines = _lines(log)  # the worker still runs: its shutdown notice is Celery's, printed, not logged
    finally:
        worker.stop()
        standin.stop()

    assert {"DEBUG", "INFO", "WARNING"} <= {line["level"] for line in lines}
    outcomes = {line["blob"]: line for line in lines if line.get("event") == "image" and line["job_id"] == first}
    assert set(outcomes) == {"img-0.jpg", "img-1.jpg", "img-2.jpg", "bad/notes.jpg"}
    for blob, line in outcomes.items():
        assert line["service"] == SERVICE
        assert line["container"] == container
        assert line["task_ms"] > 0
        assert line["download_ms"] >= 0
        assert line["check_ms"] >= 0
        assert line["upload_ms"] >= 0
        if blob == "bad/notes.jpg":
            assert (line["outcome"], line["code"], line["level"]) == ("rejected", "not_an_image", "INFO")
            assert "score_ms" not in line
        else:
            assert (line["outcome"], line["status"]) == ("ok", "ok")
            assert "code" not in line
            assert line["score_ms"] > 0
    assert sum(1 for line in lines if line.get("event") == "image" and line["job_id"] == first) == 4
    assert retry["blob"] == "img-new.jpg"
    assert retry["service"] == SERVICE
    assert retry["level"] == "WARNING"
    assert "rejects the key" in retry["message"]
    assert "check BLOBSCORE_SCORING_KEY" in retry["message"]
    everything = log.read_text("utf-8")
    for secret in (OLD_KEY, NEW_KEY, AZURITE_ACCOUNT_KEY, "AccountKey=", "sig="):
        assert secret not in everything, f"{secret!r} in the worker's log"
