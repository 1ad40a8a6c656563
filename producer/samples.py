"""Real sample photos that ship inside PyPI packages (scikit-image, matplotlib), as JPEG bytes."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from PIL import Image


def _jpeg(pixels: npt.NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _skimage(name: str) -> Callable[[], bytes]:
    def load() -> bytes:
        from skimage import data

        pixels = getattr(data, name)()
        if isinstance(pixels, tuple):  # stereo_motorcycle returns (left, right, disparity)
            pixels = pixels[0]
        return _jpeg(np.asarray(pixels, dtype=np.uint8))

    return load


def _grace_hopper() -> bytes:
    from matplotlib import cbook

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with open(path, "rb") as handle:
        return handle.read()


SAMPLES: dict[str, Callable[[], bytes]] = {
    "chelsea.jpg": _skimage("chelsea"),
    "coffee.jpg": _skimage("coffee"),
    "astronaut.jpg": _skimage("astronaut"),
    "rocket.jpg": _skimage("rocket"),
    "motorcycle.jpg": _skimage("stereo_motorcycle"),
    "grace_hopper.jpg": _grace_hopper,
}


def sample_photos() -> dict[str, bytes]:
    """Every sample photo by blob name."""
    return {name: load() for name, load in SAMPLES.items()}
