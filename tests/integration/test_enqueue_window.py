"""The producer on real Redis and Azurite: page by page, never more than the window queued, resumable."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from azure.storage.blob import BlobServiceClient
from pipeline_helpers import blobscore_env, start_standin, start_worker, wait_until_done
from shared_helpers import container_of_jpegs, run_cli_json

from producer.enqueue import EnqueueOptions, enqueue, run_listing
from producer.publishing import TaskPublisher
from worker.celery_app import create_app
from worker.contracts import ImageTask
from worker.jobs import JobSpec, JobStore
from worker.settings import load_settings
from worker.storage import BlobStore

pytestmark = pytest.mark.integration

IMAGES = 30
SERVICE = "window-svc"


@pytest.fixture
def photos_container(blob_service: BlobServiceClient) -> str:
    return container_of_jpegs(blob_service, "window", IMAGES, (32, 24))


def _parts(tmp_path: Path, redis_url: str, azurite: Any, container: str) -> tuple[Any, JobStore, BlobStore, JobSpec]:
    queue = f"window-{uuid.uuid4().hex[:8]}"
    settings = load_settings(tmp_path, broker_url=redis_url, queue=queue, service=SERVICE,
                             blob_connection_string=azurite.connection_string)
    spec = JobSpec(container, "", SERVICE, container, f"blobscore-results/{SERVICE}/")
    return settings, JobStore.from_settings(settings), BlobStore.from_settings(settings), spec


def test_the_window_bounds_the_queue_and_workers_drain_it(
    tmp_path: Path, redis_url: str, azurite: Any, photos_container: str
) -> None:
    settings, jobs, store, spec = _parts(tmp_path, redis_url, azurite, photos_container)
    publish = TaskPublisher(create_app(settings), settings.queue_for(SERVICE))
    reports: list[Any] = []
    producer = threading.Thread(
        target=lambda: reports.append(
            enqueue(store, jobs, publish, spec, settings.deployment, EnqueueOptions(window=8, page_size=5))
        ),
        daemon=True,
    )
    producer.start()
    client = redis.Redis.from_url(redis_url)
    queue_key = settings.queue_for(SERVICE)
    deadline, longest = time.monotonic() + 3, 0
    while time.monotonic() < deadline:
        longest = max(longest, int(client.llen(queue_key)))
        time.sleep(0.05)
    # No worker yet: the producer stops at the window instead of queueing all 30.
    assert 0 < longest <= 8
    assert producer.is_alive()
    standin, port = start_standin(tmp_path, "--no-model", "--emulate-latency-ms", "1", "--service-name", SERVICE,
                                  key="k")
    env = blobscore_env(broker_url=redis_url, connection_string=azurite.connection_string, scoring_port=port,
                        key="k", service_name=SERVICE, extra={"BLOBSCORE_QUEUE": settings.queue})
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        producer.join(timeout=60)
        assert not producer.is_alive()
        status = wait_until_done(env, tmp_path, reports[0].job_id)
    finally:
        worker.stop()
        standin.stop()
    assert (status["listed"], status["ok"], status["rejected"]) == (IMAGES, IMAGES, 0)
    results = list(store.list_metadata(photos_container, spec.results_prefix))
    assert len(results) == IMAGES


def test_a_killed_producer_resumes_where_it_stopped(
    tmp_path: Path, redis_url: str, azurite: Any, photos_container: str
) -> None:
    settings, jobs, store, spec = _parts(tmp_path, redis_url, azurite, photos_container)
    published: list[ImageTask] = []

    def publish_then_die(tasks: list[ImageTask]) -> None:
        if len(published) >= 10:
            raise KeyboardInterrupt("producer killed")
        published.extend(tasks)

    job_id = jobs.create(spec, settings.deployment)
    with pytest.raises(KeyboardInterrupt):
        run_listing(store, jobs, publish_then_die, job_id, EnqueueOptions(page_size=5))
    progress = jobs.progress(job_id)
    assert (progress.next_index, progress.done) == (10, False)
    assert progress.continuation is not None
    report = run_listing(store, jobs, published.extend, job_id, EnqueueOptions(page_size=5))
    assert report.listed == IMAGES
    # Every image queued exactly once, with its own index, in listing order.
    assert [task.index for task in published] == list(range(IMAGES))
    assert sorted(task.blob for task in published) == [f"img-{n:03d}.jpg" for n in range(IMAGES)]
    status = jobs.status(job_id)
    assert (status.listed, status.state) == (IMAGES, "running")
    assert sorted(jobs.members(job_id, "listed")) == sorted(task.blob for task in published)


def test_cli_resume_of_a_finished_listing_queues_nothing(
    tmp_path: Path, redis_url: str, azurite: Any, photos_container: str
) -> None:
    settings, *_ = _parts(tmp_path, redis_url, azurite, photos_container)
    env = blobscore_env(broker_url=redis_url, connection_string=azurite.connection_string, scoring_port=1,
                        key="k", service_name=SERVICE, extra={"BLOBSCORE_QUEUE": settings.queue})
    first = run_cli_json(env, tmp_path, "enqueue", "--wait", "--container", photos_container, "--limit", "12")
    assert first["listed"] == 12
    again = run_cli_json(env, tmp_path, "enqueue", "--wait", "--resume", first["job_id"])
    assert again == {**first, "skipped_current": 0}
    client = redis.Redis.from_url(redis_url)
    assert client.llen(settings.queue_for(SERVICE)) == 12
