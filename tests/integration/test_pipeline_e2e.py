"""The whole job on the real local stack: Redis, Azurite, the stand-in with the real model, a Celery worker."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from pipeline_helpers import blobscore_env, read_stats, start_standin, start_worker, wait_until_done
from shared_helpers import jpeg_bytes, run_cli, run_cli_json, settings_of

from producer.samples import sample_photos

pytestmark = pytest.mark.integration

KEY = "e2e-secret-key"
SERVICE = "e2e-resnet"
RESULTS = f"blobscore-results/{SERVICE}/"
CAT_CLASSES = {281, 282, 283, 284, 285}


def _bad_files() -> dict[str, bytes]:
    good = jpeg_bytes(5, (400, 300))
    return {
        "bad/notes.jpg": b"this is a text file with a .jpg name\n",
        "bad/truncated.jpg": good[: len(good) // 2],
        "bad/empty.jpg": b"",
    }


def _result(blob_service: BlobServiceClient, container: str, blob: str) -> dict[str, Any]:
    data = blob_service.get_blob_client(container, f"{RESULTS}{blob}.json").download_blob().readall()
    parsed: dict[str, Any] = json.loads(data)
    return parsed


@pytest.fixture(scope="module")
def scored_container(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, azurite: Any, blob_service: BlobServiceClient
) -> Iterator[dict[str, Any]]:
    """A container of sample photos and bad files, scored once by a real worker (shared by this module)."""
    workdir = tmp_path_factory.mktemp("e2e")
    stats_file = workdir / "standin-stats.json"
    standin, port = start_standin(
        workdir, "--model", "resnet50", "--service-name", SERVICE, "--stats-file", str(stats_file), key=KEY
    )
    container_name = f"e2e-{uuid.uuid4().hex[:12]}"
    container = blob_service.create_container(container_name)
    photos = sample_photos()
    for name, data in {**photos, **_bad_files()}.items():
        container.upload_blob(name, data, overwrite=True)
    container.upload_blob("readme.txt", b"not an image, not a .jpg: never listed")
    env = blobscore_env(broker_url=redis_url, connection_string=azurite.connection_string,
                        scoring_port=port, key=KEY, service_name=SERVICE)
    worker = start_worker(env, workdir / "worker.log")
    try:
        enqueued = run_cli_json(env, workdir, "enqueue", "--wait", "--container", container_name)
        status = wait_until_done(env, workdir, enqueued["job_id"])
        yield {"env": env, "cwd": workdir, "job": enqueued, "status": status, "photos": photos,
               "stats_file": stats_file, "container": container_name, "worker": worker}
    finally:
        worker.stop()
        standin.stop()


def test_every_image_gets_one_result_with_sensible_labels(
    scored_container: dict[str, Any], blob_service: BlobServiceClient
) -> None:
    photos, container = scored_container["photos"], scored_container["container"]
    assert scored_container["job"]["listed"] == len(photos) + 3
    assert scored_container["status"] == {
        "job_id": scored_container["job"]["job_id"], "listed": len(photos) + 3, "ok": len(photos),
        "rejected": 3, "retrying": 0, "pending": 0, "state": "done",
    }
    chelsea = _result(blob_service, container, "chelsea.jpg")
    assert chelsea["schema"] == "blobscore.result/v1"
    assert chelsea["status"] == "ok"
    assert chelsea["service"] == {"name": SERVICE, "model": "resnet50"}
    assert len(chelsea["labels"]) == 5
    assert {label["class_id"] for label in chelsea["labels"]} & CAT_CLASSES
    assert chelsea["labels"][0]["class_id"] in CAT_CLASSES
    coffee = _result(blob_service, container, "coffee.jpg")
    assert coffee["labels"][0] == {**coffee["labels"][0], "class_id": 967, "label": "espresso"}
    for name in photos:
        assert _result(blob_service, container, name)["status"] == "ok"
    codes = {name: _result(blob_service, container, name)["error"]["code"] for name in _bad_files()}
    assert codes == {"bad/notes.jpg": "not_an_image", "bad/truncated.jpg": "truncated", "bad/empty.jpg": "empty"}
    listed_results = [b.name for b in blob_service.get_container_client(container).list_blobs(RESULTS)]
    assert len(listed_results) == len(photos) + 3
    # Bad files never reach the scorer; every photo is scored exactly once.
    stats = read_stats(scored_container["stats_file"])
    assert stats["predict_calls"] == len(photos)
    assert set(stats["by_sha256"].values()) == {1}


def test_enqueueing_again_writes_nothing_and_scores_nothing(
    scored_container: dict[str, Any], blob_service: BlobServiceClient
) -> None:
    env, cwd, container = scored_container["env"], scored_container["cwd"], scored_container["container"]
    before = {b.name: b.etag for b in blob_service.get_container_client(container).list_blobs(RESULTS)}
    calls_before = read_stats(scored_container["stats_file"])["predict_calls"]
    again = run_cli_json(env, cwd, "enqueue", "--wait", "--container", container)
    assert again["listed"] == 0
    assert again["skipped_current"] == len(before)
    assert wait_until_done(env, cwd, again["job_id"])["state"] == "done"
    after = {b.name: b.etag for b in blob_service.get_container_client(container).list_blobs(RESULTS)}
    assert after == before
    assert read_stats(scored_container["stats_file"])["predict_calls"] == calls_before


def test_a_retried_task_finds_its_result_and_does_not_score_again(
    scored_container: dict[str, Any], blob_service: BlobServiceClient
) -> None:
    from worker.celery_app import create_app
    from worker.contracts import TASK_NAME

    env, cwd, container = scored_container["env"], scored_container["cwd"], scored_container["container"]
    source = blob_service.get_blob_client(container, "chelsea.jpg").get_blob_properties()
    result_etag = blob_service.get_blob_client(container, f"{RESULTS}chelsea.jpg.json").get_blob_properties().etag
    calls_before = read_stats(scored_container["stats_file"])["predict_calls"]
    settings = settings_of(env)
    queue, home = settings.queue_for(SERVICE), settings.deployment
    listed = sorted([*scored_container["photos"], *_bad_files()])
    message = {"namespace": home.namespace, "account": home.account.name, "endpoint": home.account.endpoint,
               "job_id": scored_container["job"]["job_id"], "index": listed.index("chelsea.jpg"),
               "container": container, "blob": "chelsea.jpg", "etag": source.etag, "size": source.size,
               "service": SERVICE, "results_container": container, "results_prefix": RESULTS}
    app = create_app(settings)
    # Delivered again as a retry would be (restored messages carry kombu's `redelivered` flag; the fault
    # suite covers those): such a delivery looks for the result before downloading or scoring anything.
    for _ in range(2):
        app.send_task(TASK_NAME, args=[message], queue=queue, retries=1)
    # A marker task queued behind the duplicates: once its result exists, the duplicates were processed.
    blob_service.get_blob_client(container, "marker.jpg").upload_blob(jpeg_bytes(9), overwrite=True)
    marker = blob_service.get_blob_client(container, "marker.jpg").get_blob_properties()
    marker_message = {**message, "index": 1000, "blob": "marker.jpg", "etag": marker.etag, "size": marker.size}
    app.send_task(TASK_NAME, args=[marker_message], queue=queue)
    _wait_for_blob(blob_service, container, f"{RESULTS}marker.jpg.json")
    assert blob_service.get_blob_client(container, f"{RESULTS}chelsea.jpg.json").get_blob_properties().etag == (
        result_etag
    )
    assert read_stats(scored_container["stats_file"])["predict_calls"] == calls_before + 1
    status = run_cli_json(env, cwd, "status", scored_container["job"]["job_id"])
    assert status["ok"] == len(scored_container["photos"]) + 1


def test_results_export_jsonl_and_csv(scored_container: dict[str, Any]) -> None:
    env, cwd, job = scored_container["env"], scored_container["cwd"], scored_container["job"]
    lines = run_cli(env, cwd, "results", job["job_id"], "--format", "jsonl").splitlines()
    docs = [json.loads(line) for line in lines]
    status = run_cli_json(env, cwd, "status", job["job_id"])
    # The marker task of the redelivery test was never listed: the export covers the job's listing.
    assert len(docs) == job["listed"] == status["listed"]
    assert len({doc["source"]["blob"] for doc in docs}) == len(docs)
    assert {doc["status"] for doc in docs} == {"ok", "rejected"}
    rows = list(csv.DictReader(io.StringIO(run_cli(env, cwd, "results", job["job_id"], "--format", "csv"))))
    by_blob = {row["blob"]: row for row in rows}
    assert by_blob["coffee.jpg"]["label"] == "espresso"
    assert by_blob["bad/empty.jpg"]["error_code"] == "empty"


def test_no_secret_reaches_the_queue_results_or_logs(
    scored_container: dict[str, Any], blob_service: BlobServiceClient
) -> None:
    container = scored_container["container"]
    worker_log = Path(scored_container["cwd"] / "worker.log").read_text()
    standin_log = Path(scored_container["cwd"] / "standin.log").read_text()
    account_key = scored_container["env"]["BLOBSCORE_BLOB_CONNECTION_STRING"].split("AccountKey=")[1].split(";")[0]
    assert KEY not in worker_log
    assert KEY not in standin_log
    assert account_key not in worker_log
    for blob in blob_service.get_container_client(container).list_blobs(RESULTS):
        body = blob_service.get_blob_client(container, blob.name).download_blob().readall().decode()
        assert KEY not in body
        assert account_key not in body


def _wait_for_blob(blob_service: BlobServiceClient, container: str, name: str, timeout: float = 60) -> None:
    import time

    from azure.core.exceptions import ResourceNotFoundError

    deadline = time.monotonic() + timeout
    while True:
        try:
            blob_service.get_blob_client(container, name).get_blob_properties()
            return
        except ResourceNotFoundError:
            assert time.monotonic() < deadline, f"{name} never appeared"
            time.sleep(0.3)
