"""Every FPGA model profile end to end on the local stack: the stand-in switched to it, a worker configured for it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from pipeline_helpers import blobscore_env, start_standin, start_worker, wait_until_done
from shared_helpers import run_cli_json

from deploy.standin.ssd_replay import KnownBox, write_replay
from producer.samples import sample_photos
from worker.models.labels import PASCAL_VOC_21

pytestmark = pytest.mark.integration

KEY = "profiles-key"
CAT_CLASSES = {281, 282, 283, 284, 285}
# Boxes the replayed SSD tensors encode: (y1, x1, y2, x2) fractions of the image.
KNOWN_BOXES = (
    KnownBox(class_id=8, score=0.93, box=(0.10, 0.20, 0.80, 0.75)),  # cat
    KnownBox(class_id=15, score=0.71, box=(0.05, 0.55, 0.45, 0.95)),  # person
)


def _run_job(
    workdir: Path, redis_url: str, azurite: Any, blob_service: BlobServiceClient, model: str, *standin_args: str
) -> tuple[str, dict[str, dict[str, Any]]]:
    service = f"svc-{model.replace('_', '-')}"
    standin, port = start_standin(workdir, "--model", model, "--service-name", service, *standin_args, key=KEY)
    container = f"profile-{uuid.uuid4().hex[:12]}"
    client = blob_service.create_container(container)
    photos = sample_photos()
    for name in ("chelsea.jpg", "coffee.jpg"):
        client.upload_blob(name, photos[name])
    env = blobscore_env(broker_url=redis_url, connection_string=azurite.connection_string, scoring_port=port,
                        key=KEY, service_name=service, model=model)
    worker = start_worker(env, workdir / "worker.log", concurrency=2)
    try:
        job = run_cli_json(env, workdir, "enqueue", "--container", container)
        status = wait_until_done(env, workdir, job["job_id"])
    finally:
        worker.stop()
        standin.stop()
    assert (status["ok"], status["rejected"]) == (2, 0)
    prefix = f"blobscore-results/{service}/"
    results = {
        name: json.loads(client.get_blob_client(f"{prefix}{name}.json").download_blob().readall())
        for name in ("chelsea.jpg", "coffee.jpg")
    }
    return service, results


@pytest.mark.parametrize("model", ["resnet50", "resnet152", "densenet121", "vgg16"])
def test_classification_profile_end_to_end(
    model: str, tmp_path: Path, redis_url: str, azurite: Any, blob_service: BlobServiceClient
) -> None:
    service, results = _run_job(tmp_path, redis_url, azurite, blob_service, model)
    coffee, chelsea = results["coffee.jpg"], results["chelsea.jpg"]
    assert coffee["service"] == {"name": service, "model": model}
    assert (coffee["labels"][0]["class_id"], coffee["labels"][0]["label"]) == (967, "espresso")
    assert chelsea["labels"][0]["class_id"] in CAT_CLASSES
    scores = [label["score"] for label in coffee["labels"]]
    assert scores == sorted(scores, reverse=True)
    # vgg16 answers logits: the worker's softmax must still give probabilities.
    assert 0.5 < scores[0] <= 1.0
    assert "detections" not in coffee


def test_ssd_vgg_profile_returns_the_replayed_boxes(
    tmp_path: Path, redis_url: str, azurite: Any, blob_service: BlobServiceClient
) -> None:
    replay = tmp_path / "ssd.npz"
    write_replay(replay, KNOWN_BOXES)
    _, results = _run_job(tmp_path, redis_url, azurite, blob_service, "ssd_vgg", "--replay", str(replay))
    coffee = results["coffee.jpg"]
    assert "labels" not in coffee
    detections = sorted(coffee["detections"], key=lambda d: -d["score"])
    assert [(d["class_id"], d["label"]) for d in detections] == [(8, "cat"), (15, "person")]
    assert [d["label"] for d in detections] == [PASCAL_VOC_21[8], PASCAL_VOC_21[15]]
    width, height = 600, 400  # skimage's coffee photo: the pixel boxes follow its non-square shape
    for detection, known in zip(detections, KNOWN_BOXES, strict=True):
        assert detection["score"] == pytest.approx(known.score, abs=1e-4)
        assert detection["box"] == pytest.approx(list(known.box), abs=1e-4)
        y1, x1, y2, x2 = known.box
        assert detection["box_px"] == pytest.approx([y1 * height, x1 * width, y2 * height, x2 * width], abs=0.6)
