"""Every ordinary mistake is one line naming what to fix, exit code 2, and never a traceback (the real command)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from producer.diagnosis import problems
from worker.jobs import JobError, JobStatus
from worker.presence import QueuePresence

AZURITE = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
           "BlobEndpoint=http://127.0.0.1:1/devstoreaccount1;")


def blobscore(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("BLOBSCORE_")}
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], cwd=tmp_path, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=60, check=False)


def one_line_error(completed: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert completed.returncode == 2, completed
    assert "Traceback" not in completed.stderr
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_a_malformed_config_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "blobscore.toml").write_text("[blobscore\n")
    one_line_error(blobscore(tmp_path, "status", "job"), str(tmp_path / "blobscore.toml"), "not valid TOML")


def test_a_misspelt_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    (tmp_path / "blobscore.toml").write_text('[blobscore]\nbroker_urll = "redis://elsewhere:6379/0"\n')
    one_line_error(blobscore(tmp_path, "status", "job"), "unknown setting 'broker_urll'", "did you mean 'broker_url'")


def test_a_key_outside_the_blobscore_table_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "blobscore.toml").write_text('broker_url = "redis://elsewhere:6379/0"\n')
    one_line_error(blobscore(tmp_path, "status", "job"), "unknown top-level key(s) broker_url", "[blobscore]")


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    one_line_error(blobscore(tmp_path, "status", "job", env={"BLOBSCORE_CONFIG": str(tmp_path / "nope.toml")}),
                   "nope.toml does not exist")


def test_a_bad_value_names_its_variable(tmp_path: Path) -> None:
    one_line_error(blobscore(tmp_path, "status", "job", env={"BLOBSCORE_SCORING_PORT": "abc"}),
                   "BLOBSCORE_SCORING_PORT", "valid integer")
    one_line_error(blobscore(tmp_path, "status", "job", env={"BLOBSCORE_WORKER_CONCURRENCY": "0"}),
                   "BLOBSCORE_WORKER_CONCURRENCY", "greater than or equal to 1")


def test_a_secret_value_is_never_echoed(tmp_path: Path) -> None:
    line = one_line_error(blobscore(tmp_path, "enqueue", "--container", "c",
                                    env={"BLOBSCORE_BLOB_CONNECTION_STRING": "garbage-secret-value"}),
                          "BLOBSCORE_BLOB_CONNECTION_STRING")
    assert "garbage-secret-value" not in line


def test_an_unknown_model_profile_is_named(tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x")
    one_line_error(blobscore(tmp_path, "score", str(image), "--address", "127.0.0.1:1", "--model", "resnet9000"),
                   "unknown model profile 'resnet9000'", "resnet50")


@pytest.mark.parametrize("value", ["-3", "0"])
def test_worker_concurrency_must_be_positive(tmp_path: Path, value: str) -> None:
    one_line_error(blobscore(tmp_path, "worker", "--concurrency", value, env={"BLOBSCORE_BLOB_CONNECTION_STRING":
                                                                            AZURITE}), "--concurrency")


def test_usage_errors_are_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    one_line_error(blobscore(tmp_path, "status"), "Missing argument")
    one_line_error(blobscore(tmp_path, "no-such-command"), "No such command")
    debug = blobscore(tmp_path, "--debug", "status", "job", env={"BLOBSCORE_SCORING_PORT": "abc"})
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr


def test_version(tmp_path: Path) -> None:
    completed = blobscore(tmp_path, "--version")
    assert completed.returncode == 0
    assert completed.stdout.startswith("blobscore ")


def _status(pending: int, retrying: int, state: str = "running") -> JobStatus:
    return JobStatus("j", listed=pending, ok=0, rejected=0, retrying=retrying, pending=pending, state=state)  # type: ignore[arg-type]


def test_a_stuck_job_says_why() -> None:
    key_error = JobError("UNAUTHENTICATED", "eastus", "scoring service eastus rejects the key — check EASTUS_KEY",
                         count=4, first_seen=1000.0, last_seen=1010.0)
    never = QueuePresence("blobscore.ns.eastus", worker_seen_s=None, task_taken_s=None)
    alive = QueuePresence("blobscore.ns.eastus", worker_seen_s=2.0, task_taken_s=1.0)
    gone = QueuePresence("blobscore.ns.eastus", worker_seen_s=120.0, task_taken_s=130.0)
    assert problems(_status(2, 2), [key_error], alive) == [
        "2 images waiting: scoring service eastus rejects the key — check EASTUS_KEY (since "
        f"{_clock(1000.0)}, last {_clock(1010.0)}, 4×)"
    ]
    assert "no worker has ever consumed queue blobscore.ns.eastus" in problems(_status(2, 0), [], never)[0]
    assert "last seen 120 s ago" in problems(_status(2, 0), [], gone)[0]
    assert problems(_status(2, 0, "done"), [key_error], never) == []
    assert problems(_status(0, 0), [], never) == []


def _clock(timestamp: float) -> str:
    import time

    return time.strftime("%H:%M:%S", time.localtime(timestamp))


def test_a_listing_nobody_carries_says_so() -> None:
    never = QueuePresence("blobscore.ns:listing", worker_seen_s=None, task_taken_s=None)
    alive = QueuePresence("blobscore.ns:listing", worker_seen_s=1.0, task_taken_s=1.0)
    idle = QueuePresence("blobscore.ns.eastus", worker_seen_s=1.0, task_taken_s=None)
    listing = _status(0, 0, "listing")
    assert "nothing is carrying the listing" in problems(listing, [], idle, never)[0]
    assert problems(listing, [], idle, alive) == []
