"""`blobscore stack up|down|status` on real processes: Redis, Azurite (and, once they land, stand-in + worker)."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from azure.storage.blob import BlobServiceClient
from PIL import Image

from deploy.local import stack
from deploy.local.procs import ManagedProcess, free_port, tcp_answers
from deploy.local.redis_local import redis_answers
from deploy.local.stack import StackError, StackSettings, StackStatus

MACHINE_REDIS = "redis://127.0.0.1:6379/0"
REDIS_AND_AZURITE: tuple[stack.PieceName, ...] = ("redis", "azurite")

@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A working directory whose stack is always taken down after the test."""
    yield tmp_path
    stack.down(tmp_path)


def _piece(report: StackStatus, name: str) -> stack.PieceStatus:
    return next(piece for piece in report.pieces if piece.name == name)


def test_up_reuses_the_answering_redis_and_starts_azurite(workdir: Path, redis_url: str) -> None:
    report = stack.up(workdir, pieces=REDIS_AND_AZURITE, broker_url=redis_url)

    assert report.running
    redis_piece, azurite_piece = _piece(report, "redis"), _piece(report, "azurite")
    assert (redis_piece.alive, redis_piece.started_by_us, redis_piece.pid) == (True, False, None)
    assert azurite_piece.alive
    assert azurite_piece.started_by_us
    assert azurite_piece.pid
    assert report.settings is not None
    assert report.settings.broker_url == redis_url
    assert report.settings.blob_connection_string is not None
    with BlobServiceClient.from_connection_string(report.settings.blob_connection_string) as client:
        client.create_container("stack-smoke")
        assert [container.name for container in client.list_containers()] == ["stack-smoke"]


def test_state_file_is_private_and_holds_the_client_settings(workdir: Path, redis_url: str) -> None:
    stack.up(workdir, pieces=REDIS_AND_AZURITE, broker_url=redis_url)

    state_file = workdir / ".blobscore" / "stack.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    state = json.loads(state_file.read_text())
    assert state["settings"]["broker_url"] == redis_url
    assert "BlobEndpoint=http://127.0.0.1:" in state["settings"]["blob_connection_string"]
    assert state["settings"]["service"] == "local"
    assert None not in state["settings"].values()  # the settings loader would take a null as a value
    assert {piece["name"]: piece["started_by_us"] for piece in state["pieces"]} == {"redis": False, "azurite": True}


def test_the_settings_loader_picks_the_stack_up(workdir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import load_settings

    for variable in ("BLOBSCORE_BROKER_URL", "BLOBSCORE_BLOB_CONNECTION_STRING", "BLOBSCORE_CONFIG"):
        monkeypatch.delenv(variable, raising=False)
    report = stack.up(workdir, pieces=REDIS_AND_AZURITE, broker_url=redis_url)

    settings = load_settings(workdir=workdir)
    assert settings.broker_url == redis_url
    assert report.settings is not None
    assert settings.blob_connection_string is not None
    assert settings.blob_connection_string.get_secret_value() == report.settings.blob_connection_string


def test_second_up_starts_nothing(workdir: Path, redis_url: str) -> None:
    first = stack.up(workdir, pieces=REDIS_AND_AZURITE, broker_url=redis_url)
    second = stack.up(workdir, pieces=REDIS_AND_AZURITE)

    assert second.pieces == first.pieces
    assert second.settings == first.settings


def test_down_stops_only_what_up_started(workdir: Path, redis_url: str) -> None:
    report = stack.up(workdir, pieces=REDIS_AND_AZURITE, broker_url=redis_url)
    azurite_pid = _piece(report, "azurite").pid
    assert azurite_pid is not None
    azurite = ManagedProcess.attach(azurite_pid, workdir / "unused.log")

    assert stack.down(workdir) == ["azurite"]

    assert not azurite.alive()
    assert redis_answers(redis_url)
    assert redis_answers(MACHINE_REDIS)
    assert stack.status(workdir).pieces == []
    assert stack.down(workdir) == []


def test_up_starts_a_redis_where_none_answers_and_down_stops_it(workdir: Path, redis_url: str) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    assert not redis_answers(url)

    report = stack.up(workdir, pieces=("redis",), broker_url=url)

    redis_piece = _piece(report, "redis")
    assert redis_piece.alive
    assert redis_piece.started_by_us
    assert redis_piece.pid
    assert redis_answers(url)
    client = redis.Redis.from_url(url)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}  # queued tasks survive a restart
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
    finally:
        client.close()

    assert stack.down(workdir) == ["redis"]
    assert not redis_answers(url)
    assert redis_answers(redis_url)  # the machine's Redis is untouched


def test_azurite_data_survives_down_and_up(workdir: Path, redis_url: str) -> None:
    first = stack.up(workdir, pieces=REDIS_AND_AZURITE, broker_url=redis_url)
    assert first.settings is not None
    assert first.settings.blob_connection_string
    with BlobServiceClient.from_connection_string(first.settings.blob_connection_string) as client:
        client.create_container("kept").upload_blob("a.txt", b"still here")
    stack.down(workdir)

    second = stack.up(workdir, pieces=REDIS_AND_AZURITE, broker_url=redis_url)

    assert second.settings is not None
    assert second.settings.blob_connection_string
    with BlobServiceClient.from_connection_string(second.settings.blob_connection_string) as client:
        assert client.get_blob_client("kept", "a.txt").download_blob().readall() == b"still here"


def test_up_restarts_a_piece_that_died(workdir: Path, redis_url: str) -> None:
    first = stack.up(workdir, pieces=REDIS_AND_AZURITE, broker_url=redis_url)
    dead_pid = _piece(first, "azurite").pid
    assert dead_pid is not None
    ManagedProcess.attach(dead_pid, workdir / "unused.log").kill()

    after_crash = stack.status(workdir)
    assert not after_crash.running
    assert not _piece(after_crash, "azurite").alive

    repaired = stack.up(workdir, pieces=REDIS_AND_AZURITE)
    azurite_piece = _piece(repaired, "azurite")
    assert repaired.running
    assert azurite_piece.alive
    assert azurite_piece.pid != dead_pid


def test_switching_brokers_while_running_is_refused(workdir: Path, redis_url: str) -> None:
    stack.up(workdir, pieces=REDIS_AND_AZURITE, broker_url=redis_url)

    with pytest.raises(StackError, match="stack down"):
        stack.up(workdir, pieces=REDIS_AND_AZURITE, broker_url=f"redis://127.0.0.1:{free_port()}/0")


def test_unknown_piece_is_refused(workdir: Path) -> None:
    with pytest.raises(StackError, match="unknown stack pieces"):
        stack.up(workdir, pieces=("redis", "postgres"))  # type: ignore[arg-type]
    assert not (workdir / ".blobscore" / "stack.json").exists()


def test_cli_up_status_json_down(workdir: Path, redis_url: str) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "deploy.local.cli", *args, "--workdir", str(workdir)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)

    started = cli("up", "--only", "redis", "--only", "azurite", "--broker-url", redis_url)
    assert started.returncode == 0, started.stderr

    shown = cli("status", "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["running"] is True
    assert [(piece["name"], piece["alive"]) for piece in report["pieces"]] == [("redis", True), ("azurite", True)]
    assert report["settings"]["broker_url"] == redis_url
    assert "BlobEndpoint=http://127.0.0.1:" in report["settings"]["blob_connection_string"]

    stopped = cli("down")
    assert stopped.returncode == 0, stopped.stderr
    assert "azurite" in stopped.stdout
    assert "redis" not in stopped.stdout
    port = int(report["settings"]["blob_connection_string"].split("127.0.0.1:")[1].split("/")[0])
    assert not tcp_answers("127.0.0.1", port)


def test_status_masks_the_scoring_key() -> None:
    settings = StackSettings(broker_url=MACHINE_REDIS, scoring_port=5000, scoring_key="s3cret")

    assert settings.masked().scoring_key == "***"
    assert "s3cret" not in settings.masked().model_dump_json()
    assert settings.as_env()["BLOBSCORE_SCORING_KEY"] == "s3cret"  # the worker gets the real one
    assert settings.as_env()["BLOBSCORE_SCORING_PORT"] == "5000"
    assert "BLOBSCORE_BLOB_CONNECTION_STRING" not in settings.as_env()  # unset stays unset


def test_fixtures_give_working_services(redis_url: str, blob_service: BlobServiceClient, tmp_container: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        client.set("blobscore:fixture-check", "1")
        assert client.get("blobscore:fixture-check") == b"1"
        assert client.connection_pool.connection_kwargs["db"] == 9
    finally:
        client.close()
    container = blob_service.get_container_client(tmp_container)
    container.upload_blob("x.jpg", b"bytes")
    assert [blob.name for blob in container.list_blobs()] == ["x.jpg"]


def _blobscore(workdir: Path, *args: str) -> dict[str, object]:
    """`blobscore ARGS --json` run in `workdir` with no BLOBSCORE_* variables: settings come from the stack."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BLOBSCORE_")}
    argv = [sys.executable, "-m", "producer.cli", *args, "--json"]
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _a_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 120, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.timeout(300)  # the stand-in's first start builds its model
def test_full_stack_scores_an_image_for_commands_run_in_its_directory(workdir: Path) -> None:
    # A Redis of the stack's own on a free port, so its worker takes no task queued by other tests.
    broker_url = f"redis://127.0.0.1:{free_port()}/0"
    report = stack.up(workdir, broker_url=broker_url, workers=2)

    assert report.running
    assert [piece.name for piece in report.pieces] == ["redis", "azurite", "standin", "worker"]
    workers = _piece(report, "worker")
    assert (len(workers.children), workers.restarts) == (2, 0)
    assert all(piece.started_by_us for piece in report.pieces)
    settings = report.settings
    assert settings is not None
    assert settings.scoring_key == "***"
    assert settings.scoring_address == "127.0.0.1"
    assert settings.scoring_port is not None
    assert tcp_answers("127.0.0.1", settings.scoring_port)
    key_file = workdir / ".blobscore" / "standin.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    stored = json.loads((workdir / ".blobscore" / "stack.json").read_text())
    assert stored["settings"]["scoring_key"] == key_file.read_text().strip()

    assert stack.up(workdir).pieces == report.pieces  # idempotent with every piece

    assert settings.blob_connection_string is not None
    with BlobServiceClient.from_connection_string(settings.blob_connection_string) as client:
        client.create_container("photos").upload_blob("one.jpg", _a_jpeg())
    job_id = _blobscore(workdir, "enqueue", "--container", "photos")["job_id"]
    assert isinstance(job_id, str)
    deadline = time.monotonic() + 120
    while (job := _blobscore(workdir, "status", job_id))["state"] != "done" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (job["state"], job["ok"], job["rejected"]) == ("done", 1, 0)

    # A worker killed (or stopped by a kombu error): the stack's supervisor starts another within seconds.
    victim = workers.children[0]
    os.kill(victim, 9)
    deadline = time.monotonic() + 30
    while True:
        status = json.loads(subprocess.run([sys.executable, "-m", "producer.cli", "stack", "status", "--json"],
                                           cwd=workdir, capture_output=True, text=True, check=True).stdout)
        worker_status = next(piece for piece in status["pieces"] if piece["name"] == "worker")
        if worker_status["restarts"] == 1 and len(worker_status["children"]) == 2:
            break
        assert time.monotonic() < deadline, f"the killed worker was not restarted: {worker_status}"
        time.sleep(0.5)
    assert victim not in worker_status["children"]
    with BlobServiceClient.from_connection_string(settings.blob_connection_string) as client:
        client.get_container_client("photos").upload_blob("two.jpg", _a_jpeg())
    job_id = _blobscore(workdir, "enqueue", "--container", "photos")["job_id"]
    deadline = time.monotonic() + 120
    while (job := _blobscore(workdir, "status", job_id))["state"] != "done" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (job["state"], job["ok"]) == ("done", 1)

    pids = [piece.pid for piece in report.pieces if piece.pid is not None] + worker_status["children"]
    assert stack.down(workdir) == ["worker", "standin", "azurite", "redis"]
    assert not any(ManagedProcess.attach(pid, workdir / "unused.log").alive() for pid in pids)
    assert not redis_answers(broker_url)
