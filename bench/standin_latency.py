"""Measure the stand-in classifier: model build and cached-load times, and per-image latency on CPU.

Per-image latency covers decode + preprocess + inference (``ImageClassifier.probabilities``) on the
real sample photos shipped by scikit-image and matplotlib, single-threaded. Prints one JSON object.

    .venv/bin/python bench/standin_latency.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from matplotlib import cbook
from PIL import Image
from skimage import data

from deploy.standin.classifier import ImageClassifier

# Colour photos bundled inside scikit-image itself (no download), from 451x300 up to 1411x1411.
SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "retina")


def _jpeg(pixels: np.ndarray[Any, Any]) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(out, format="JPEG", quality=95)
    return out.getvalue()


def sample_photos() -> dict[str, bytes]:
    """JPEG bytes of the sample photos that ship inside installed packages."""
    photos = {name: _jpeg(getattr(data, name)()) for name in SKIMAGE_PHOTOS}
    photos["grace_hopper"] = Path(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))).read_bytes()
    return photos


def _timed(action: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = action()
    return result, (time.perf_counter() - start) * 1000.0


def _percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def measure(rounds: int) -> dict[str, Any]:
    """Build time, cached load time and per-image latency statistics, in milliseconds."""
    photos = sample_photos()
    with tempfile.TemporaryDirectory(prefix="blobscore-bench-") as cache:
        _, build_ms = _timed(lambda: ImageClassifier(cache_dir=Path(cache), threads=1))
        classifier, load_ms = _timed(lambda: ImageClassifier(cache_dir=Path(cache), threads=1))
    for photo in photos.values():  # warm-up: first runs allocate arenas and pick kernels
        classifier.probabilities(photo)
    per_photo: dict[str, list[float]] = {name: [] for name in photos}
    for _ in range(rounds):
        for name, photo in photos.items():
            per_photo[name].append(_timed(lambda photo=photo: classifier.probabilities(photo))[1])
    latencies = [ms for samples in per_photo.values() for ms in samples]
    return {
        "what": "stand-in EfficientNet-Lite0 (onnxruntime CPU), decode+preprocess+inference per image",
        "threads": 1,
        "photos": {name: len(blob) for name, blob in photos.items()},
        "requests": len(latencies),
        "latency_ms": {
            "p50": round(_percentile(latencies, 50), 2),
            "p99": round(_percentile(latencies, 99), 2),
            "mean": round(statistics.fmean(latencies), 2),
            "min": round(min(latencies), 2),
        },
        "p50_ms_per_photo": {name: round(_percentile(ms, 50), 2) for name, ms in per_photo.items()},
        "model_build_ms": round(build_ms, 1),
        "cached_load_ms": round(load_ms, 1),
        "onnxruntime": ort.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def main() -> None:
    """Parse the round count, measure, and print the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=20, help="passes over the sample photos")
    args = parser.parse_args()
    print(json.dumps(measure(args.rounds), indent=2))


if __name__ == "__main__":
    main()
