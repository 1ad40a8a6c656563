"""A deterministic corpus of camera-sized JPEGs made from the real sample photos, cached on disk.

    .venv/bin/python bench/photo_corpus.py                  # 240 photos, seed 11: generate (or reuse), print sizes
    .venv/bin/python bench/photo_corpus.py --count 40 --seed 3 --cache-dir /tmp/photos

The sample photos (`producer.samples`, 0.1-0.4 MP) are far smaller than what a camera or a phone writes, and a
tiny image hides every per-image cost that grows with the file: the download, the decode that checks the image,
the Predict request that carries it. Each photo here is:

 * a random crop (55-100 % of the largest crop at the chosen aspect: 4:3, 3:2, 16:9 or 1:1; a fifth of them
   portrait) of one sample, upscaled (bicubic) to 1.2-12 MP, log-uniform: half under ~4 MP, a few at 12 MP;
 * given sensor-like noise: gaussian, independent per pixel and per channel, sigma 3-8 (blue noisier than green,
   as a Bayer sensor's), without which an upscale is so smooth that its JPEG is a few hundred KB at 12 MP;
 * written the way cameras and phones write. From 8 MP up it is a camera's original: quality 90-95, baseline,
   half of them 4:2:2 (as DSLRs write). Below, an export or a resized copy: quality 75-95 (more of them high),
   4:2:0, a third of them progressive (as web exports are). Every file has an EXIF block (Make, Model, DateTime,
   Orientation): a landscape frame is tagged 1 for most, 6, 8 or 3 for the rest (the pixels stay as the sensor
   saw them and the tag says how to turn them, as a phone does); a portrait frame is stored upright (1).

Everything is drawn from a seeded generator per photo, so the same parameters give the same bytes (with the same
Pillow and libjpeg; the cache key includes Pillow's version and a hash of the sample photos). Generating a 12 MP
photo takes ~1 s on one core, so the files are kept under $XDG_CACHE_HOME/blobscore/bench-photos/<key>/ (default
~/.cache/...; the key covers everything but the count), each NNNNNN.jpg with a NNNNNN.json of its recipe and size;
a later run reads them back and generates only the photos it does not find.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image

# Bump when the recipe changes: it is part of the cache key, so old files are never mistaken for new ones.
RECIPE_VERSION = 1
DEFAULT_COUNT = 240
DEFAULT_SEED = 11
MIN_MP, MAX_MP = 1.2, 12.0
CAMERA_ORIGINAL_MP = 8.0  # at and above: a camera's own file, saved at its "fine" quality (90-95)
ASPECTS = ((4, 3, 0.55), (3, 2, 0.25), (16, 9, 0.12), (1, 1, 0.08))  # (long, short, share)
ORIENTATIONS = ((1, 0.62), (6, 0.24), (8, 0.08), (3, 0.06))  # (EXIF orientation, share) of landscape frames
CHANNEL_NOISE = np.array([1.0, 0.85, 1.3], dtype=np.float32)  # R, G, B relative to the drawn sigma
# (camera original, smaller copy): cameras write baseline, web exports are often progressive; DSLRs write 4:2:2,
# phones and most software 4:2:0.
PROGRESSIVE_SHARE = (0.05, 0.35)
SUBSAMPLING_422_SHARE = (0.5, 0.1)
CAMERAS = (("Canon", "Canon EOS 80D"), ("Apple", "iPhone 12"), ("SONY", "ILCE-6000"), ("samsung", "SM-G991B"))
EXIF_ORIENTATION, EXIF_MAKE, EXIF_MODEL, EXIF_DATETIME = 0x0112, 0x010F, 0x0110, 0x0132


@dataclass(frozen=True)
class Recipe:
    """How one photo is made: every random choice, drawn before any pixel is touched."""

    name: str
    source: str
    crop: tuple[int, int, int, int]
    size: tuple[int, int]
    sigma: float
    quality: int
    progressive: bool
    subsampling: int  # Pillow's code: 2 = 4:2:0, 1 = 4:2:2
    orientation: int
    camera: tuple[str, str]
    taken: str  # EXIF DateTime


@dataclass(frozen=True)
class Photo:
    """One generated file and what it is."""

    path: Path
    bytes: int
    width: int
    height: int
    recipe: Recipe

    @property
    def megapixels(self) -> float:
        """Width × height / 10^6."""
        return self.width * self.height / 1e6


def _weighted(rng: np.random.Generator, choices: tuple[tuple[Any, ...], ...]) -> tuple[Any, ...]:
    """One of `choices`, whose last element is its share."""
    shares = np.array([choice[-1] for choice in choices], dtype=float)
    return choices[int(rng.choice(len(choices), p=shares / shares.sum()))]


def _crop_box(rng: np.random.Generator, source: tuple[int, int], aspect: float) -> tuple[int, int, int, int]:
    """A random box of the source at `aspect` (width / height), 55-100 % of the largest such box."""
    width, height = source
    largest_w = min(width, height * aspect)
    crop_w = largest_w * rng.uniform(0.55, 1.0)
    crop_h = crop_w / aspect
    left = rng.uniform(0, width - crop_w)
    top = rng.uniform(0, height - crop_h)
    return round(left), round(top), round(left + crop_w), round(top + crop_h)


def _quality(rng: np.random.Generator, megapixels: float) -> int:
    """90-95 for a camera original; 75-95 for a smaller (exported, resized) photo, more of them high."""
    if megapixels >= CAMERA_ORIGINAL_MP:
        return int(rng.integers(90, 96))
    return min(95, 75 + int(21 * math.sqrt(rng.random())))


def draw_recipe(index: int, seed: int, sources: dict[str, tuple[int, int]]) -> Recipe:
    """The recipe of photo `index`: its own generator (seed, index), so a photo does not depend on the others."""
    rng = np.random.default_rng([seed, index])
    source = sorted(sources)[int(rng.integers(len(sources)))]
    long_side, short_side, _ = _weighted(rng, ASPECTS)
    portrait = rng.random() < 0.2  # a portrait crop stored upright (edited, or a camera that rotates pixels)
    aspect = short_side / long_side if portrait else long_side / short_side
    megapixels = math.exp(rng.uniform(math.log(MIN_MP), math.log(MAX_MP)))
    width = round(math.sqrt(megapixels * 1e6 * aspect))
    height = round(width / aspect)
    original = 0 if megapixels >= CAMERA_ORIGINAL_MP else 1  # index into the (original, copy) shares
    return Recipe(
        name=f"{index:06d}.jpg",
        source=source,
        crop=_crop_box(rng, sources[source], aspect),
        size=(width, height),
        sigma=float(rng.uniform(3.0, 8.0)),
        quality=_quality(rng, megapixels),
        progressive=bool(rng.random() < PROGRESSIVE_SHARE[original]),
        subsampling=1 if rng.random() < SUBSAMPLING_422_SHARE[original] else 2,
        # Pixels already upright need no turn; a landscape frame may be a phone held upright (6, 8) or upside down.
        orientation=1 if portrait else int(_weighted(rng, ORIENTATIONS)[0]),
        camera=CAMERAS[int(rng.integers(len(CAMERAS)))],
        taken=f"2024:05:{1 + index % 28:02d} 10:{index % 60:02d}:00",
    )


def _noisy(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """`image` with gaussian noise per pixel and channel (float32: a 12 MP frame is 144 MB as float32)."""
    pixels = np.asarray(image, dtype=np.float32)
    noise = rng.standard_normal(pixels.shape, dtype=np.float32)
    noise *= sigma * CHANNEL_NOISE
    pixels += noise
    np.clip(pixels, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8))  # height × width × 3 uint8: RGB


def _exif(recipe: Recipe) -> bytes:
    exif = Image.Exif()
    exif[EXIF_MAKE], exif[EXIF_MODEL] = recipe.camera
    exif[EXIF_DATETIME] = recipe.taken
    exif[EXIF_ORIENTATION] = recipe.orientation
    return exif.tobytes()


def render(recipe: Recipe, source: Image.Image, seed: int, index: int) -> bytes:
    """The JPEG bytes of one recipe (the noise has its own generator, so it is the same for the same photo)."""
    upscaled = source.crop(recipe.crop).resize(recipe.size, Image.Resampling.BICUBIC)
    noisy = _noisy(upscaled, recipe.sigma, np.random.default_rng([seed, index, 1]))
    out = io.BytesIO()
    noisy.save(out, format="JPEG", quality=recipe.quality, progressive=recipe.progressive,
               subsampling=recipe.subsampling, exif=_exif(recipe))
    return out.getvalue()


def _sources() -> dict[str, bytes]:
    from producer.samples import sample_photos

    return sample_photos()


def cache_key(seed: int, sources: dict[str, bytes]) -> str:
    """What the files depend on: the recipe version, the seed, Pillow's version, the sample photos.

    Not the count: photo i is the same in a corpus of any size, so a larger corpus adds to a smaller one's files.
    """
    digest = hashlib.sha256(f"{RECIPE_VERSION}:{seed}:{PIL.__version__}".encode())
    for name in sorted(sources):
        digest.update(name.encode() + hashlib.sha256(sources[name]).digest())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/blobscore/bench-photos (~/.cache/... by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blobscore" / "bench-photos"


def _write_atomically(path: Path, data: bytes) -> None:
    # Written aside and renamed, so an interrupted run never leaves a truncated file that looks whole.
    scratch = path.with_name(f".{path.name}.{os.getpid()}.partial")
    scratch.write_bytes(data)
    scratch.replace(path)


def _generate(directory: Path, indices: list[int], seed: int, sources: dict[str, bytes], threads: int) -> None:
    """Write each photo, then its sidecar (the sidecar marks it done); threads, as Pillow and numpy drop the GIL."""
    decoded = {name: Image.open(io.BytesIO(data)).convert("RGB") for name, data in sources.items()}
    sizes = {name: image.size for name, image in decoded.items()}

    def make(index: int) -> None:
        recipe = draw_recipe(index, seed, sizes)
        data = render(recipe, decoded[recipe.source], seed, index)
        _write_atomically(directory / recipe.name, data)
        sidecar = {"bytes": len(data), **asdict(recipe)}
        _write_atomically(directory / f"{index:06d}.json", json.dumps(sidecar).encode())

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(make, indices))


def _load(directory: Path, index: int) -> Photo:
    entry = json.loads((directory / f"{index:06d}.json").read_text())
    fields = {key: entry[key] for key in Recipe.__dataclass_fields__}
    recipe = Recipe(**{**fields, "crop": tuple(fields["crop"]), "size": tuple(fields["size"]),
                       "camera": tuple(fields["camera"])})
    return Photo(directory / recipe.name, entry["bytes"], recipe.size[0], recipe.size[1], recipe)


def photo_corpus(count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED, cache_dir: Path | None = None,
                 threads: int | None = None) -> list[Photo]:
    """Photos 0..count-1 of the seed's corpus: those not in the cache yet are generated, the rest read back."""
    sources = _sources()
    directory = (cache_dir or default_cache_dir()) / cache_key(seed, sources)
    directory.mkdir(parents=True, exist_ok=True)
    missing = [index for index in range(count) if not (directory / f"{index:06d}.json").is_file()]
    if missing:
        _generate(directory, missing, seed, sources, threads or os.cpu_count() or 1)
    return [_load(directory, index) for index in range(count)]


def _spread(values: list[float], digits: int) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        position = (len(ordered) - 1) * q
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"min": round(ordered[0], digits), "p25": round(at(0.25), digits), "median": round(at(0.5), digits),
            "mean": round(statistics.mean(ordered), digits), "p75": round(at(0.75), digits),
            "max": round(ordered[-1], digits)}


def distribution(photos: list[Photo]) -> dict[str, Any]:
    """Sizes (bytes), megapixels and the share of each encoding choice: what the corpus is, in one object."""
    count = len(photos)
    orientations: dict[str, int] = {}
    for photo in photos:
        key = str(photo.recipe.orientation)
        orientations[key] = orientations.get(key, 0) + 1
    return {
        "photos": count,
        "bytes": {key: int(value) for key, value in _spread([float(p.bytes) for p in photos], 0).items()},
        "total_mb": round(sum(p.bytes for p in photos) / 1e6, 1),
        "megapixels": _spread([p.megapixels for p in photos], 2),
        "over_4mb": sum(p.bytes > 4e6 for p in photos),
        "progressive": sum(p.recipe.progressive for p in photos),
        "subsampling_422": sum(p.recipe.subsampling == 1 for p in photos),
        "exif_orientation": dict(sorted(orientations.items())),
        "quality": _spread([float(p.recipe.quality) for p in photos], 0),
        "noise_sigma": _spread([p.recipe.sigma for p in photos], 2),
    }


def main() -> None:
    """Generate (or find) the corpus and print its distribution."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--cache-dir", type=Path, default=None, help="Default: " + str(default_cache_dir()))
    args = parser.parse_args()
    photos = photo_corpus(args.count, args.seed, args.cache_dir)
    print(json.dumps({"directory": str(photos[0].path.parent), **distribution(photos)}))


if __name__ == "__main__":
    main()
