"""Delivery: the same task delivered twice at once, a source replaced or deleted between listing and scoring, and a
pickled message pushed straight into the queue.

Each test runs a job of real JPEGs through real processes and ends with a tally: nothing lost, nothing doubled.
"""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fault_helpers import FaultJob, Processes, assert_clean, held, sha256, start_worker, wait_for
from shared_helpers import jpeg_bytes

Report = Callable[[dict[str, Any]], None]


def _images(count: int, seed: int) -> dict[str, bytes]:
    return {f"img-{index:02d}.jpg": jpeg_bytes(seed + index, (96, 72)) for index in range(count)}


def queued(job: FaultJob) -> tuple[str, list[bytes]]:
    """The Redis list the job's tasks wait in (found by content, whatever the queue naming) and its raw messages."""
    client = redis.Redis.from_url(job.env["BLOBSCORE_BROKER_URL"])
    try:
        for key in client.scan_iter(match=f"{job.env['BLOBSCORE_QUEUE']}*"):
            if client.type(key) == b"list":
                raw: list[bytes] = client.lrange(key, 0, -1)  # type: ignore[assignment]
                if raw and any(job.job_id and job.job_id.encode() in base64.b64decode(json.loads(m)["body"])
                               for m in raw):
                    return key.decode(), raw
    finally:
        client.close()
    raise AssertionError(f"no queue holds job {job.job_id}'s tasks")


def push(job: FaultJob, queue: str, *messages: bytes) -> None:
    """LPUSH raw messages onto a queue, as kombu's Redis transport publishes."""
    client = redis.Redis.from_url(job.env["BLOBSCORE_BROKER_URL"])
    try:
        client.lpush(queue, *messages)
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_the_same_task_delivered_twice_at_once_writes_one_result(
    make_job: Any, procs: Processes, fault_report: Report
) -> None:
    """Scenario 10. Every queued message is published a second time (same body, same task id) before a worker with
    room for all of them starts; with a 1 s Predict both copies of each image run at the same time. The create-only
    write lets exactly one of them write; the other recognises the result as its own."""
    job = make_job()
    job.start_standin(procs, "--delay-ms", "1000")
    job.upload(_images(3, seed=3000))
    job.enqueue()
    queue, messages = queued(job)
    assert len(messages) == 3
    twins = []
    for message in messages:
        twin = json.loads(message)
        twin["properties"]["delivery_tag"] = str(uuid.uuid4())  # a second publish of the same task
        twins.append(json.dumps(twin).encode())
    push(job, queue, *twins)
    start_worker(procs, job.env, job.workdir / "worker.log", concurrency=6)
    wait_for(lambda: len(held(job)) == 6, 20, "all six deliveries running at once")
    job.wait_done(30)
    wait_for(lambda: not held(job), 20, "every delivery acked")
    tally = job.tally()
    fault_report(tally)
    assert_clean(tally)
    assert tally["ok"] == 3
    assert tally["result_writes"] == 3
    assert tally["scorer_calls_max"] == 2  # both copies did run concurrently: the write, not luck, kept it single


@pytest.mark.timeout(60)
def test_a_source_replaced_or_deleted_between_listing_and_scoring(
    make_job: Any, procs: Processes, fault_report: Report
) -> None:
    """Scenario 11. After the enqueue and before any worker runs, one image is overwritten with other bytes (new
    etag) and one is deleted. The result describes the new version (scored from the new bytes only); the deleted
    one ends `rejected` / `source_missing`."""
    job = make_job()
    job.start_standin(procs)
    images = _images(4, seed=3100)
    job.upload(images)
    job.enqueue()
    listed_etags = job.current_etags()
    replacement = jpeg_bytes(3199, (120, 90))
    job.upload({"img-01.jpg": replacement})
    job.blob_service.get_blob_client(job.container, "img-02.jpg").delete_blob()
    new_etag = job.current_etags()["img-01.jpg"]
    assert new_etag != listed_etags["img-01.jpg"]
    start_worker(procs, job.env, job.workdir / "worker.log", concurrency=2)
    job.wait_done(30)
    tally = job.tally()
    fault_report(tally)
    assert_clean(tally)
    results = job.results()
    assert results["img-01.jpg"]["status"] == "ok"
    assert results["img-01.jpg"]["source"]["etag"].strip('"') == new_etag
    assert results["img-01.jpg"]["_metadata"]["blobscore_source_etag"].strip('"') == new_etag
    assert results["img-02.jpg"]["error"]["code"] == "source_missing"
    by_hash = json.loads(job.stats_files[0].read_text())["by_sha256"]
    assert by_hash.get(sha256(replacement)) == 1
    assert sha256(images["img-01.jpg"]) not in by_hash, "the old version was scored"
    assert tally["rejected_codes"] == {"source_missing": 1}


class _CreatesAFile:
    """Unpickling this creates a file: the side effect a pickled message must never have."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


@pytest.mark.timeout(60)
def test_a_pickled_message_pushed_into_the_queue_is_refused_with_no_side_effect(
    make_job: Any, procs: Processes, fault_report: Report, tmp_path: Path
) -> None:
    """Scenario 14. A kombu message whose body is a pickle (content type application/x-python-serialize) that would
    create a file if it were ever unpickled is LPUSHed onto the job's queue among real tasks. The worker refuses it
    and says so in its log, the file never appears, and every real task is scored, before and after it."""
    job = make_job()
    job.start_standin(procs)
    job.upload(_images(4, seed=3200))
    job.enqueue()
    queue, messages = queued(job)
    evidence = tmp_path / "pickle-was-executed"
    evil = json.loads(messages[0])
    evil["body"] = base64.b64encode(pickle.dumps(((_CreatesAFile(evidence),), {}, {}))).decode()
    evil["content-type"] = "application/x-python-serialize"
    evil["content-encoding"] = "binary"
    evil["headers"]["id"] = evil["properties"]["correlation_id"] = str(uuid.uuid4())
    evil["properties"]["delivery_tag"] = str(uuid.uuid4())
    push(job, queue, json.dumps(evil).encode())  # consumed after the four real tasks
    worker = start_worker(procs, job.env, job.workdir / "worker.log", concurrency=2)
    job.wait_done(30)
    wait_for(lambda: "untrusted content" in worker.log.read_text(), 20, "the refusal in the worker's log")
    first = job.tally(refusal_logged=True, side_effect=evidence.exists())
    first["scenario"] += "[tasks around the pickle]"
    fault_report(first)
    assert_clean(first)
    assert not evidence.exists(), "the pickle was executed"
    assert worker.alive()
    # The worker goes on: a new job after the refusal is scored like any other.
    job.upload({"after-the-pickle.jpg": jpeg_bytes(3399)})
    job.enqueue()
    job.wait_done(30)
    second = job.tally()
    second["scenario"] += "[a job after it]"
    fault_report(second)
    assert_clean(second)
    assert second["ok"] == 1  # the four earlier images are current: only the new one is listed
    assert not evidence.exists()
    log = worker.log.read_text()
    assert "application/x-python-serialize" in log
