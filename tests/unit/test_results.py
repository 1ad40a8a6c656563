"""Result naming, the schema v1 document and what makes a stored result current."""

import json

from worker.contracts import RESULT_SCHEMA, ImageTask, ResultDoc, SourceRef
from worker.errors import PermanentError, RejectionCode
from worker.models.classification import Label
from worker.models.postprocess import Prediction
from worker.models.ssd import Detection
from worker.results import (
    ExistingResult,
    existing_from_metadata,
    is_current,
    ok_result,
    rejected_result,
    result_blob_name,
    result_location,
    result_metadata,
    source_blob_name,
    unaddressable_reason,
)

TASK = ImageTask(
    namespace="acct-0123abcd", account="acct", endpoint="acct.blob.core.windows.net",
    job_id="j1", index=0, container="photos", blob="2024/cat.jpg", etag='"0x1"', size=1234, service="local",
    results_container="photos", results_prefix="blobscore-results/local/",
)
SOURCE = SourceRef(container="photos", blob="2024/cat.jpg", etag='"0x1"', size=1234)


def test_result_name_is_deterministic_and_reversible() -> None:
    name = result_blob_name("blobscore-results/local/", "2024/cat.jpg")
    assert name == "blobscore-results/local/2024/cat.jpg.json"
    assert source_blob_name("blobscore-results/local/", name) == "2024/cat.jpg"
    assert source_blob_name("blobscore-results/other/", name) is None
    assert source_blob_name("blobscore-results/local/", "blobscore-results/local/x.txt") is None


def test_ok_document_has_schema_v1_fields() -> None:
    doc = ok_result(
        TASK, SOURCE, "resnet50", Prediction(labels=[Label(285, "Egyptian cat", 0.37)]), {"download": 1.23456}
    )
    body = json.loads(doc.to_json())
    assert next(iter(body)) == "schema"
    assert body["schema"] == RESULT_SCHEMA
    assert body["status"] == "ok"
    assert body["source"] == {"container": "photos", "blob": "2024/cat.jpg", "etag": '"0x1"', "size": 1234}
    assert body["service"] == {"name": "local", "model": "resnet50"}
    assert body["labels"] == [{"class_id": 285, "label": "Egyptian cat", "score": 0.37}]
    assert "error" not in body
    assert body["timings_ms"] == {"download": 1.235}
    assert body["scored_at"].endswith("Z")
    assert ResultDoc.from_json(doc.to_json()) == doc


def test_rejected_document_carries_the_code() -> None:
    error = PermanentError(RejectionCode.TRUNCATED, "the JPEG stream does not decode")
    body = json.loads(rejected_result(TASK, SOURCE, "resnet50", error, {}).to_json())
    assert body["status"] == "rejected"
    assert body["error"] == {"code": "truncated", "message": "the JPEG stream does not decode"}
    assert "labels" not in body


def test_metadata_round_trip_and_currency() -> None:
    doc = rejected_result(TASK, SOURCE, "resnet50", PermanentError(RejectionCode.EMPTY, "empty"), {})
    existing = existing_from_metadata(result_metadata(doc))
    assert existing == ExistingResult(source_etag='"0x1"', status="rejected", code="empty", job_id="j1")
    assert is_current(existing, '"0x1"')
    assert not is_current(existing, '"0x2"')
    assert not is_current(None, '"0x1"')
    assert existing_from_metadata({"unrelated": "x"}) is None


def test_task_etags_have_one_spelling() -> None:
    quoted = ImageTask.from_message({**TASK.to_message(), "etag": '"0x8DD"'})
    assert quoted.etag == "0x8DD"
    assert is_current(ExistingResult("0x8DD", "ok", None, "j"), quoted.etag)


def test_detection_document_carries_boxes_not_labels() -> None:
    box, box_px = (0.1, 0.2, 0.6, 0.7), (30.0, 80.0, 180.0, 280.0)
    detection = Detection(class_id=8, label="cat", score=0.91, box=box, box_px=box_px)
    body = json.loads(ok_result(TASK, SOURCE, "ssd_vgg", Prediction(detections=[detection]), {}).to_json())
    assert "labels" not in body
    assert body["detections"] == [
        {"class_id": 8, "label": "cat", "score": 0.91, "box": list(box), "box_px": list(box_px)}
    ]
    empty = json.loads(ok_result(TASK, SOURCE, "ssd_vgg", Prediction(detections=[]), {}).to_json())
    assert empty["detections"] == []


def test_names_no_result_can_be_written_for_get_a_record_under_the_prefix() -> None:
    prefix = "blobscore-results/local/"
    assert result_location(prefix, "a/b c.jpg") == (f"{prefix}a/b c.jpg.json", None)
    assert unaddressable_reason(prefix, "%2e%2e/y.jpg") is None  # a literal percent sign is fine
    for name in ("../x.jpg", "a/./b.jpg", "a/..", "L/" + "y" * 1020 + ".jpg"):
        location, reason = result_location(prefix, name)
        assert reason is not None
        assert location.startswith(f"{prefix}.blobscore-unaddressable/")
        assert location.endswith(".json")
        assert len(location) < 1024
    longest = "l/" + "x" * (1024 - len(prefix) - len(".json") - 2)
    assert unaddressable_reason(prefix, longest) is None
    assert unaddressable_reason(prefix, longest + "x") is not None
