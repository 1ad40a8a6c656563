"""Output tensors per model profile: from the real classifier, a cheap emulation, or an SSD replay file."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile

from worker.models.catalog import (
    SSD_ANCHORS_PER_CELL,
    SSD_GRID_SIZES,
    SSD_NUM_CLASSES,
    ModelProfile,
    OutputKind,
    get_profile,
)

FloatArray = npt.NDArray[np.float32]
OutputMap = dict[str, FloatArray]

IMAGENET_CLASSES = 1000
SSD_BOX_COORDINATES = 4
# Large enough for any photo, small enough that a hostile header cannot make us allocate gigabytes.
MAX_PIXELS = 64_000_000
# JPEGs are decoded at 1/8 scale for the validity check: the whole entropy-coded stream is still read.
_DRAFT_SIDE = 32
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# The emulated distribution: these probabilities on five hash-chosen classes, the rest spread evenly.
_EMULATED_TOP = np.array([0.5, 0.2, 0.1, 0.05, 0.03], dtype=np.float64)


class UnreadableImageError(Exception):
    """The request's bytes do not decode as an image (the service answers INVALID_ARGUMENT)."""


class ReplayFileError(Exception):
    """The --replay archive is missing, unreadable, or does not hold the profile's tensors."""


class OutputSource(Protocol):
    """Computes one profile's output tensors (batch dimension 1) for one encoded image."""

    @property
    def emulated(self) -> bool:
        """True when the outputs are not real predictions of the image."""
        ...

    def outputs(self, image_bytes: bytes) -> OutputMap:
        """The output tensors by name; UnreadableImageError if the bytes are not an image."""
        ...


class Classifier(Protocol):
    """The real model's interface (deploy.standin.classifier.ImageClassifier)."""

    def probabilities(self, image_bytes: bytes) -> FloatArray:
        """Softmax over the 1000 ImageNet classes, shape (1000,)."""
        ...

    def logits(self, image_bytes: bytes) -> FloatArray:
        """Logits over the 1000 ImageNet classes, shape (1000,)."""
        ...


def check_decodes(image_bytes: bytes) -> None:
    """Raise UnreadableImageError unless the bytes decode completely as an image (cheaply: JPEG at 1/8)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on: truncated images would pass as valid")
    try:
        with Image.open(io.BytesIO(image_bytes)) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise UnreadableImageError(f"image of {width}x{height} pixels exceeds {MAX_PIXELS} pixels")
            if img.format == "JPEG":
                img.draft("RGB", (_DRAFT_SIDE, _DRAFT_SIDE))
            img.load()
    except _DECODE_ERRORS as exc:
        raise UnreadableImageError(f"cannot decode image: {exc}") from exc


def output_shapes(profile: ModelProfile) -> dict[str, tuple[int, ...]]:
    """Each output's shape with batch dimension 1, by the profile's (possibly overridden) tensor names."""
    if profile.kind is OutputKind.SSD:
        return dict(zip(profile.outputs, _ssd_shapes(), strict=True))
    return {name: (1, IMAGENET_CLASSES) for name in profile.outputs}


def _ssd_shapes() -> tuple[tuple[int, ...], ...]:
    """SSD-VGG shapes in catalog order: the six class-logit tensors, then the six box-offset tensors."""
    cells = tuple(zip(SSD_GRID_SIZES, SSD_ANCHORS_PER_CELL, strict=True))
    logits = tuple((1, grid, grid, anchors, SSD_NUM_CLASSES) for grid, anchors in cells)
    offsets = tuple((1, grid, grid, anchors, SSD_BOX_COORDINATES) for grid, anchors in cells)
    return logits + offsets


class ClassifierSource:
    """The real classifier's ImageNet scores: softmax for softmax profiles, logits for logit profiles."""

    emulated = False

    def __init__(self, profile: ModelProfile, classifier: Classifier, undecodable: type[Exception]) -> None:
        """Serve `profile` from `classifier`, whose `undecodable` exception marks bytes that are no image."""
        if profile.kind is OutputKind.SSD:
            raise ValueError("the ImageNet classifier cannot serve the SSD profile; use --replay")
        self._name = profile.outputs[0]
        self._score = classifier.logits if profile.kind is OutputKind.LOGITS else classifier.probabilities
        self._undecodable = undecodable

    def outputs(self, image_bytes: bytes) -> OutputMap:
        """The 1000 class scores as a [1, 1000] float32 tensor."""
        try:
            scores = self._score(image_bytes)
        except self._undecodable as exc:
            raise UnreadableImageError(str(exc)) from exc
        return {self._name: np.asarray(scores, dtype=np.float32).reshape(1, IMAGENET_CLASSES)}


def load_classifier_source(profile: ModelProfile, cache_dir: Path | None, threads: int) -> ClassifierSource:
    """Load the real model once (imported here so --no-model never loads onnxruntime)."""
    from deploy.standin.classifier import ImageClassifier, UndecodableImageError

    return ClassifierSource(profile, ImageClassifier(cache_dir=cache_dir, threads=threads), UndecodableImageError)


def emulated_probabilities(image_bytes: bytes) -> FloatArray:
    """A fixed-looking distribution derived from the image's hash: deterministic, cheap, and not a prediction."""
    seed = int.from_bytes(hashlib.sha256(image_bytes).digest()[:8], "little")
    classes = np.random.default_rng(seed).choice(IMAGENET_CLASSES, size=_EMULATED_TOP.size, replace=False)
    rest = (1.0 - _EMULATED_TOP.sum()) / (IMAGENET_CLASSES - _EMULATED_TOP.size)
    probabilities = np.full(IMAGENET_CLASSES, rest, dtype=np.float64)
    probabilities[classes] = _EMULATED_TOP
    return probabilities.astype(np.float32)


class EmulatedSource:
    """Benchmark-only stand-in for the model: answers after a fixed latency with emulated_probabilities."""

    emulated = True

    def __init__(self, profile: ModelProfile, latency_ms: float) -> None:
        """Emulate `profile` (softmax or logits) taking `latency_ms` per image."""
        if profile.kind is OutputKind.SSD:
            raise ValueError("the SSD profile is served from --replay, not emulated")
        self._name = profile.outputs[0]
        self._logits = profile.kind is OutputKind.LOGITS
        self._latency_s = max(0.0, latency_ms) / 1000.0

    def outputs(self, image_bytes: bytes) -> OutputMap:
        """Check the image decodes, wait the emulated latency, return the emulated [1, 1000] scores."""
        started = time.perf_counter()
        check_decodes(image_bytes)
        scores = emulated_probabilities(image_bytes)
        if self._logits:
            # log p: a softmax of these logits gives back p, so top-1 agrees with the softmax profiles.
            scores = np.log(scores).astype(np.float32)
        _sleep_until(started + self._latency_s)
        return {self._name: scores.reshape(1, IMAGENET_CLASSES)}


class ReplaySource:
    """SSD-VGG outputs replayed from a .npz file (no real SSD weights can be had offline); emulated."""

    emulated = True

    def __init__(self, tensors: Mapping[str, FloatArray], latency_ms: float = 0.0) -> None:
        """Replay `tensors` (by output name) for every decodable image, after `latency_ms`."""
        self._tensors = dict(tensors)
        self._latency_s = max(0.0, latency_ms) / 1000.0

    def outputs(self, image_bytes: bytes) -> OutputMap:
        """Check the image decodes, then return the recorded tensors."""
        started = time.perf_counter()
        check_decodes(image_bytes)
        _sleep_until(started + self._latency_s)
        return dict(self._tensors)


def load_replay(path: Path, profile: ModelProfile) -> dict[str, FloatArray]:
    """The profile's tensors from a .npz keyed by output names (the overridden or the catalog's ones).

    Every tensor must have its SSD-VGG shape with batch 1; ReplayFileError says what is wrong.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = {name: np.asarray(archive[name]) for name in archive.files}
    except (OSError, ValueError) as exc:
        raise ReplayFileError(f"cannot read replay file {path}: {exc}") from exc
    catalog_names = get_profile(profile.name).outputs
    tensors: dict[str, FloatArray] = {}
    for (name, shape), catalog_name in zip(output_shapes(profile).items(), catalog_names, strict=True):
        array = stored.get(name, stored.get(catalog_name))
        if array is None:
            raise ReplayFileError(f"replay file {path} has no tensor {name!r}")
        if array.shape != shape:
            raise ReplayFileError(f"replay tensor {name!r} has shape {list(array.shape)}, expected {list(shape)}")
        tensors[name] = array.astype(np.float32)
    return tensors


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)
