"""Time the image check on camera-sized JPEGs: the structural check (default) vs the full Pillow decode.

The photos are the real sample photos (`producer.samples.sample_photos()`), upscaled to about 1, 4, 8 and 12
megapixels with gaussian sensor-like noise added so the files are camera-sized at quality 90, each saved baseline
and progressive. For each file: the median ms of `check_image` as configured by `image_check = "structure"` and
`"decode"`, and of the two slower ways to skip entropy-coded data the structural check does not use. One JSON
object on stdout.

    .venv/bin/python bench/image_check.py [--rounds 30] [--decode-rounds 7] [--noise 20]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from PIL import Image

from producer.samples import sample_photos
from worker.imaging import check_image

SIZES = {"1MP": (1152, 864), "4MP": (2304, 1728), "8MP": (3264, 2448), "12MP": (4000, 3000)}
MAX_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 80_000_000
# The next marker after entropy-coded data: FF followed by anything but a stuffed 00 or a restart marker.
MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")


def camera_jpeg(photo: bytes, size: tuple[int, int], noise: float, seed: int, progressive: bool) -> bytes:
    """The photo upscaled to `size` with gaussian noise, as a quality-90 JPEG."""
    upscaled = Image.open(io.BytesIO(photo)).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    rng = np.random.default_rng(seed)
    pixels = np.asarray(upscaled, dtype=np.float32)
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * noise
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=90, progressive=progressive
    )
    return buffer.getvalue()


def median_ms(action: Callable[[], object], rounds: int) -> float:
    """The median wall time of `action` over `rounds` runs, after one warm-up run."""
    action()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000.0)
    return round(statistics.median(times), 3)


def _first_scan_data(data: bytes) -> int:
    pos = 2
    while data[pos + 1] != 0xDA:
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")


def _find_loop(data: bytes, start: int) -> int:
    """The next marker found with one bytes.find per FF byte (a Python loop over ~1 FF in 256 bytes)."""
    pos = start
    while True:
        pos = data.find(b"\xff", pos)
        follower = data[pos + 1]
        if follower == 0 or 0xD0 <= follower <= 0xD7:
            pos += 2
            continue
        return pos


def measure(rounds: int, decode_rounds: int, noise: float) -> dict[str, Any]:
    """Sizes and median timings of each check, per file."""
    photos = list(sample_photos().items())
    files: list[dict[str, Any]] = []
    for index, (label, size) in enumerate(SIZES.items()):
        source, photo = photos[index % len(photos)]
        for progressive in (False, True):
            data = camera_jpeg(photo, size, noise, seed=index, progressive=progressive)
            scan = _first_scan_data(data)
            check = partial(check_image, data, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
            structure = median_ms(check, rounds)
            decode = median_ms(partial(check, decode=True), decode_rounds)
            row: dict[str, Any] = {
                "megapixels": label, "size": list(size), "source_photo": source, "progressive": progressive,
                "bytes": len(data), "structure_ms": structure, "decode_ms": decode,
                "decode_over_structure": round(decode / structure, 1),
            }
            if not progressive:
                # The ways not taken, over the single scan of the baseline file (see worker/jpeg_structure.py).
                row["alternative_regex_scan_ms"] = median_ms(partial(MARKER.search, data, scan), rounds)
                row["alternative_find_loop_ms"] = median_ms(partial(_find_loop, data, scan), rounds)
            files.append(row)
    return {
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "rounds": {"structure": rounds, "decode": decode_rounds},
        "noise_sigma": noise,
        "files": files,
    }


def main() -> None:
    """Parse the options, measure, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="timed runs of the structural check per file")
    parser.add_argument("--decode-rounds", type=int, default=7, help="timed runs of the full decode per file")
    parser.add_argument("--noise", type=float, default=20.0, help="sigma of the added gaussian noise (0-255 scale)")
    args = parser.parse_args()
    print(json.dumps(measure(args.rounds, args.decode_rounds, args.noise), indent=2))


if __name__ == "__main__":
    main()
