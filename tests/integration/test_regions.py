"""Regional routing on the real stack: two stand-ins acting as two regions' services, one worker per region.

Each stand-in requires its own key and service route; the services registry (a blobscore.toml in the workers'
directory) names the variable holding each key. A job for service A is queued on A's queue, consumed only by the
eastus worker, and scored by A's stand-in with A's key; the same for B in westeurope.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from azure.storage.blob import BlobServiceClient
from pipeline_helpers import read_stats, start_standin, wait_until_done
from shared_helpers import jpeg_bytes, run_cli_json

from deploy.local.procs import ManagedProcess, free_port
from deploy.local.redis_local import start_redis
from worker.settings import load_settings

pytestmark = pytest.mark.integration

IMAGES = 4


@dataclass(frozen=True)
class Region:
    """One region's scoring service as the registry names it, and its stand-in."""

    service: str
    region: str
    key_env: str
    key: str
    route: str
    stats_file: Path


REGIONS = {
    "A": ("svc-a", "eastus", "REGIONS_TEST_KEY_A", "key-of-service-a", "route-a"),
    "B": ("svc-b", "westeurope", "REGIONS_TEST_KEY_B", "key-of-service-b", "route-b"),
}


@pytest.fixture(scope="module")
def private_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of this module's own (the shared test database is flushed by other sessions)."""
    workdir = tmp_path_factory.mktemp("regions-redis")
    port = free_port()
    process = start_redis(port, workdir, appendonly=True)
    yield f"redis://127.0.0.1:{port}/0"
    process.stop()


@pytest.fixture(scope="module")
def regions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Region], dict[str, int]]]:
    """Two stand-ins, each requiring its own key and route."""
    started, ports, found = [], {}, {}
    try:
        for label, (service, region, key_env, key, route) in REGIONS.items():
            workdir = tmp_path_factory.mktemp(f"standin-{label}")
            stats = workdir / "stats.json"
            process, port = start_standin(workdir, "--model", "resnet50", "--no-model", "--emulate-latency-ms", "1",
                                          "--service-name", route, "--stats-file", str(stats), key=key)
            started.append(process)
            ports[label] = port
            found[label] = Region(service, region, key_env, key, route, stats)
        yield found, ports
    finally:
        for process in started:
            process.stop()


def _config(regions: dict[str, Region], ports: dict[str, int], queue: str) -> str:
    tables = [f'[blobscore]\nqueue = "{queue}"\n']
    for label, region in regions.items():
        tables.append(
            f'[services.{region.service}]\nregion = "{region.region}"\naddress = "127.0.0.1"\nport = {ports[label]}\n'
            f'tls = false\nkey_env = "{region.key_env}"\nroute = "{region.route}"\nmodel = "resnet50"\n'
        )
    return "\n".join(tables)


def _start_region_worker(env: dict[str, str], workdir: Path, region: str) -> ManagedProcess:
    process = ManagedProcess.start(
        [sys.executable, "-m", "producer.cli", "worker", "--region", region, "--concurrency", "4"],
        workdir / f"worker-{region}.log", env=env, cwd=workdir,
    )
    process.wait_for_log(r"ready\.", timeout=60)
    return process


def _results(blob_service: BlobServiceClient, container: str, service: str) -> list[dict[str, Any]]:
    client = blob_service.get_container_client(container)
    return [json.loads(client.download_blob(blob.name).readall())
            for blob in client.list_blobs(name_starts_with=f"blobscore-results/{service}/")]


def test_each_service_is_scored_only_by_its_regions_worker_with_its_key(
    tmp_path: Path, regions: tuple[dict[str, Region], dict[str, int]], private_redis_url: str, azurite: Any,
    blob_service: BlobServiceClient,
) -> None:
    found, ports = regions
    a, b = found["A"], found["B"]
    queue = f"regions-{uuid.uuid4().hex[:8]}"
    (tmp_path / "blobscore.toml").write_text(_config(found, ports, queue))
    env = {name: value for name, value in os.environ.items() if not name.startswith("BLOBSCORE_")}
    env.update({"BLOBSCORE_BROKER_URL": private_redis_url,
                "BLOBSCORE_BLOB_CONNECTION_STRING": azurite.connection_string,
                a.key_env: a.key, b.key_env: b.key, "PYTHONUNBUFFERED": "1"})
    container = f"regions-{uuid.uuid4().hex[:12]}"
    client = blob_service.create_container(container)
    for number in range(IMAGES):
        client.upload_blob(f"img-{number}.jpg", jpeg_bytes(200 + number))
    settings = load_settings(tmp_path, broker_url=private_redis_url,
                             blob_connection_string=azurite.connection_string)
    broker = redis.Redis.from_url(private_redis_url)
    westeurope = _start_region_worker(env, tmp_path, "westeurope")
    eastus: ManagedProcess | None = None
    try:
        # Both jobs queued while only westeurope's worker runs: B's is scored, A's waits on A's queue untouched.
        job_a = run_cli_json(env, tmp_path, "enqueue", "--wait", "--container", container, "--service", a.service)
        job_b = run_cli_json(env, tmp_path, "enqueue", "--wait", "--container", container, "--service", b.service)
        assert job_a["listed"] == job_b["listed"] == IMAGES
        assert wait_until_done(env, tmp_path, job_b["job_id"], timeout=60)["ok"] == IMAGES
        assert run_cli_json(env, tmp_path, "status", job_a["job_id"])["pending"] == IMAGES
        assert broker.llen(settings.queue_for(a.service)) == IMAGES
        assert read_stats(a.stats_file)["predict_calls"] == 0
        # eastus's worker starts and scores A's job.
        eastus = _start_region_worker(env, tmp_path, "eastus")
        assert wait_until_done(env, tmp_path, job_a["job_id"], timeout=60)["ok"] == IMAGES
    finally:
        for worker in (westeurope, eastus):
            if worker is not None:
                worker.stop()
        broker.close()
    # Each stand-in answered exactly its images, every call with its own key and route (anything else would be
    # UNAUTHENTICATED or NOT_FOUND in its call codes).
    for region in (a, b):
        stats = read_stats(region.stats_file)
        assert stats["predict_calls"] == IMAGES
        assert stats["by_code"] == {"OK": IMAGES}
    for region in (a, b):
        docs = _results(blob_service, container, region.service)
        assert len(docs) == IMAGES
        assert {doc["service"]["name"] for doc in docs} == {region.service}
        assert {doc["status"] for doc in docs} == {"ok"}
    logs = "".join(path.read_text() for path in tmp_path.glob("worker-*.log"))
    assert a.key not in logs
    assert b.key not in logs
