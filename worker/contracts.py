"""The messages shared by producer and worker: the image task and the result document (schema v1)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TASK_NAME = "blobscore.score_image"
RESULT_SCHEMA = "blobscore.result/v1"


def normalize_etag(etag: object) -> str:
    """One spelling of an etag: Blob Storage quotes them in properties but not in listings."""
    return str(etag).strip('"')


class ImageTask(BaseModel):
    """One image to score: names and the listed etag only — never a key or a connection string.

    `namespace`, `account` and `endpoint` name the deployment and storage account the image was listed from: a
    worker of any other acts on nothing (worker/tasks.py hands the task back).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str
    account: str
    endpoint: str
    job_id: str
    # The image's position in its job's listing: its bit in the job's outcome bitmaps.
    index: int = Field(ge=0)
    container: str
    blob: str
    etag: str
    size: int
    service: str
    results_container: str
    results_prefix: str

    @field_validator("etag", mode="before")
    @classmethod
    def _one_etag_spelling(cls, value: object) -> str:
        return normalize_etag(value)

    def to_message(self) -> dict[str, Any]:
        """The JSON-able body of the Celery message."""
        return self.model_dump()

    @classmethod
    def from_message(cls, body: dict[str, Any]) -> ImageTask:
        """Validate a message body (raises pydantic.ValidationError on anything unexpected)."""
        return cls.model_validate(body)


class SourceRef(BaseModel):
    """The exact source blob version a result describes."""

    container: str
    blob: str
    etag: str
    size: int


class ServiceRef(BaseModel):
    """The scoring service that produced a result."""

    name: str
    model: str


class LabelDoc(BaseModel):
    """One ranked class."""

    class_id: int
    label: str
    score: float


class DetectionDoc(BaseModel):
    """One detected object: box as fractions (y1, x1, y2, x2) and in pixels of the original image."""

    class_id: int
    label: str
    score: float
    box: list[float]
    box_px: list[float]


class ResizeDoc(BaseModel):
    """Set when the worker sent a smaller copy of a large photo instead of the original bytes."""

    original: list[int]
    sent: list[int]


class ErrorDoc(BaseModel):
    """Why an image was rejected."""

    code: str
    message: str


class ResultDoc(BaseModel):
    """The result blob's content, schema `blobscore.result/v1`."""

    schema_: str = RESULT_SCHEMA
    status: Literal["ok", "rejected"]
    job_id: str
    source: SourceRef
    service: ServiceRef
    labels: list[LabelDoc] | None = None
    detections: list[DetectionDoc] | None = None
    resized: ResizeDoc | None = None
    error: ErrorDoc | None = None
    scored_at: str
    timings_ms: dict[str, float]

    def to_json(self) -> bytes:
        """Serialized as stored: `schema` key first, absent sections left out."""
        body = self.model_dump(exclude_none=True)
        body = {"schema": body.pop("schema_"), **body}
        return _dumps(body)

    @classmethod
    def from_json(cls, data: bytes) -> ResultDoc:
        """Parse a stored result document."""
        body = json.loads(data)
        body["schema_"] = body.pop("schema", RESULT_SCHEMA)
        return cls.model_validate(body)


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
