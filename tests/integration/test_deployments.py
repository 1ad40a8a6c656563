"""Two deployments sharing one Redis never act on each other's tasks (real Redis, two Azurites, two stand-ins).

Both stacks use the same queue base and the same service name, as two local stacks on one machine do by default:
only the namespace derived from each stack's storage account keeps them apart.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from azure.storage.blob import BlobServiceClient
from pipeline_helpers import blobscore_env, start_standin, start_worker, wait_until_done
from shared_helpers import jpeg_bytes, run_cli_json, settings_of

from deploy.local.azurite import connection_string, start_azurite
from deploy.local.procs import ManagedProcess, free_port
from worker.celery_app import publisher_app
from worker.tasks import MISROUTED_KEY, MISROUTED_SUFFIX

pytestmark = pytest.mark.integration

SERVICE = "local"  # the same service name in both stacks, as `blobscore stack up` gives every stack
RESULTS = f"blobscore-results/{SERVICE}/"


@dataclass
class Stack:
    """One deployment: its Azurite, its stand-in, its environment; a worker once started."""

    name: str
    env: dict[str, str]
    blobs: BlobServiceClient
    workdir: Path
    worker: ManagedProcess | None = None

    @property
    def queue(self) -> str:
        return settings_of(self.env).queue_for(SERVICE)

    @property
    def key_prefix(self) -> str:
        return settings_of(self.env).key_prefix

    def results(self, container: str) -> dict[str, dict[str, Any]]:
        """Every result document in this account's container, by source blob name."""
        client = self.blobs.get_container_client(container)
        return {
            item.name.removeprefix(RESULTS).removesuffix(".json"): json.loads(
                client.download_blob(item.name).readall()
            )
            for item in client.list_blobs(name_starts_with="blobscore-results/")
        }

    def etags(self, container: str) -> dict[str, str]:
        client = self.blobs.get_container_client(container)
        return {item.name: str(item.etag).strip('"') for item in client.list_blobs()
                if not item.name.startswith("blobscore-results/")}

    def start_worker(self) -> None:
        self.worker = start_worker(self.env, self.workdir / "worker.log", concurrency=2)


@pytest.fixture
def two_stacks(tmp_path: Path, redis_url: str, azurite: Any, blob_service: BlobServiceClient) -> Iterator[list[Stack]]:
    """Stack A on the session's Azurite, stack B on an Azurite of its own; one Redis, one queue base for both."""
    second_port = free_port()
    second = start_azurite(second_port, tmp_path / "azurite-b.log")
    second_blobs = BlobServiceClient.from_connection_string(connection_string(second_port))
    queue_base = f"two-{uuid.uuid4().hex[:8]}"
    started: list[ManagedProcess] = [second]
    stacks = []
    for name, conn, blobs in (("a", azurite.connection_string, blob_service),
                              ("b", connection_string(second_port), second_blobs)):
        workdir = tmp_path / name
        workdir.mkdir()
        key = f"key-{name}"
        standin, port = start_standin(workdir, "--service-name", SERVICE, "--no-model", "--emulate-latency-ms", "5",
                                      key=key)
        started.append(standin)
        env = blobscore_env(broker_url=redis_url, connection_string=conn, scoring_port=port, key=key,
                            service_name=SERVICE, extra={"BLOBSCORE_QUEUE": queue_base})
        stacks.append(Stack(name, env, blobs, workdir))
    try:
        yield stacks
    finally:
        for stack in stacks:
            if stack.worker is not None:
                stack.worker.stop()
        for process in reversed(started):
            process.stop()
        second_blobs.close()


def _fill(stack: Stack, container: str, names: list[str], seed: int) -> None:
    client = stack.blobs.create_container(container)
    for offset, name in enumerate(names):
        client.upload_blob(name, jpeg_bytes(seed + offset, (96, 64)))


def test_two_stacks_on_one_redis_each_score_only_their_own_images(two_stacks: list[Stack]) -> None:
    a, b = two_stacks
    assert a.queue != b.queue, "two Azurites must give two namespaces"
    container = f"photos-shared-{uuid.uuid4().hex[:8]}"
    # A same-named container in each account: some names in both (different bytes), some in one only.
    _fill(a, container, ["common-0.jpg", "common-1.jpg", "only-a-0.jpg", "only-a-1.jpg", "only-a-2.jpg"], 0)
    _fill(b, container, ["common-0.jpg", "common-1.jpg", "only-b-0.jpg", "only-b-1.jpg", "only-b-2.jpg"], 100)
    a.start_worker()
    b.start_worker()
    jobs: dict[str, str] = {}

    def enqueue(stack: Stack) -> None:
        jobs[stack.name] = run_cli_json(stack.env, stack.workdir, "enqueue", "--container", container)["job_id"]

    threads = [threading.Thread(target=enqueue, args=(stack,)) for stack in two_stacks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for stack in two_stacks:
        status = wait_until_done(stack.env, stack.workdir, jobs[stack.name], timeout=120)
        assert (status["listed"], status["ok"], status["rejected"], status["state"]) == (5, 5, 0, "done")
        results, etags = stack.results(container), stack.etags(container)
        # Exactly one result per image of this account, written for this stack's job from this account's bytes.
        assert set(results) == set(etags)
        for blob, doc in results.items():
            assert (doc["status"], doc["job_id"]) == ("ok", jobs[stack.name]), blob
            assert doc["source"]["etag"] == etags[blob], f"{stack.name}/{blob} scored from the other account"
    # Neither job shows in the other deployment: status there names the job's own deployment instead.
    foreign = run_cli_failing(a.env, a.workdir, "status", jobs["b"])
    assert "belongs to another deployment" in foreign
    assert "devstoreaccount1" in foreign
    # Remote control stays inside a deployment: what A's Flower or `celery control` broadcasts reaches A's worker
    # only (both workers are named celery@<this host>: a shared control exchange would bring two replies).
    for stack in two_stacks:
        replies = publisher_app(settings_of(stack.env)).control.ping(timeout=3)
        assert len(replies) == 1, f"{stack.name}: {replies}"


def run_cli_failing(env: dict[str, str], cwd: Path, *args: str) -> str:
    """Run a command that must fail with exit code 2 and one line on stderr; return that line."""
    completed = subprocess.run([sys.executable, "-m", "producer.cli", *args, "--json"], env=env, cwd=cwd,
                               capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 2, completed
    assert "Traceback" not in completed.stderr
    return completed.stderr


def test_a_foreign_task_is_handed_back_untouched_and_not_lost(two_stacks: list[Stack], redis_url: str) -> None:
    a, b = two_stacks
    container = f"handback-{uuid.uuid4().hex[:8]}"
    names = ["x-0.jpg", "x-1.jpg", "x-2.jpg"]
    _fill(a, container, names, 0)  # the same names in A: a worker of A that took B's task would find a source
    _fill(b, container, names, 50)
    broker = redis.Redis.from_url(redis_url)
    # B's job is queued while no worker of B runs.
    job_b = run_cli_json(b.env, b.workdir, "enqueue", "--wait", "--container", container)["job_id"]
    assert broker.llen(b.queue) == 3
    # One of B's messages is moved onto A's queue by hand, then A's worker starts.
    moved = broker.rpoplpush(b.queue, a.queue)
    assert moved is not None
    a.start_worker()
    deadline = time.monotonic() + 30
    while broker.llen(b.queue) < 3:
        assert time.monotonic() < deadline, "the foreign task was not handed back to its own queue"
        time.sleep(0.2)
    assert broker.llen(a.queue) == 0
    assert broker.hget(f"{a.key_prefix}{MISROUTED_KEY}", settings_of(b.env).namespace_in_use) == b"1"
    assert a.results(container) == {}, "A wrote a record for B's task"
    assert b.results(container) == {}, "nothing of B may be written before B's worker runs"
    assert "handed back" in (a.workdir / "worker.log").read_text()

    # A task stamped with A's namespace but another account (two deployments configured with one namespace)
    # cannot go anywhere A consumes: it is parked, untouched, on a queue no worker reads.
    message = json.loads(broker.lindex(b.queue, 0) or b"{}")
    body = json.loads(_decode_body(message))
    body[0][0].update(namespace=settings_of(a.env).namespace_in_use, account="evilacct",
                      endpoint="evilacct.blob.core.windows.net")
    message["body"] = _encode_body(json.dumps(body), message)
    broker.lpush(a.queue, json.dumps(message))
    deadline = time.monotonic() + 30
    while broker.llen(a.queue + MISROUTED_SUFFIX) < 1:
        assert time.monotonic() < deadline, "the task of an unknown account was not parked"
        time.sleep(0.2)
    assert a.results(container) == {}

    # B's worker takes its tasks, the handed-back one included: exactly one result each, in B only.
    b.start_worker()
    status = wait_until_done(b.env, b.workdir, job_b, timeout=60)
    assert (status["ok"], status["rejected"]) == (3, 0)
    results, etags = b.results(container), b.etags(container)
    assert set(results) == set(names)
    assert all(results[name]["source"]["etag"] == etags[name] for name in names)
    assert a.results(container) == {}
    broker.close()


def _decode_body(message: dict[str, Any]) -> str:
    raw = message["body"]
    return base64.b64decode(raw).decode() if message.get("properties", {}).get("body_encoding") == "base64" else raw


def _encode_body(body: str, message: dict[str, Any]) -> str:
    if message.get("properties", {}).get("body_encoding") == "base64":
        return base64.b64encode(body.encode()).decode()
    return body
