"""Check that downloaded bytes are a JPEG we can send: pure, cheap (its structure, no decode unless asked)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from worker.errors import PermanentError, RejectionCode
from worker.jpeg_structure import read_jpeg_structure

# Formats Pillow reports for JPEG streams: MPO is a JPEG with extra frames (phones write it); the first frame counts.
JPEG_FORMATS = frozenset({"JPEG", "MPO"})
# Decoding at reduced DCT scale still walks the whole entropy-coded stream, so truncation is caught cheaply.
CHECK_DECODE_SIZE = (256, 256)


@dataclass(frozen=True)
class ImageFacts:
    """What the check learned about an image."""

    format: str
    width: int
    height: int
    mode: str


def check_image(data: bytes, *, max_bytes: int, max_pixels: int, decode: bool = False) -> ImageFacts:
    """Return the facts of a whole JPEG, or raise PermanentError with the reason it can never be scored.

    By default only the JPEG's structure is read (markers, frame header, an end-of-image marker after the scans):
    the scoring service decodes the image itself. With `decode` the entropy-coded data is decoded too (Pillow,
    draft mode), which also catches corrupt data inside a well-formed stream.
    """
    if not data:
        raise PermanentError(RejectionCode.EMPTY, "the blob is empty")
    if len(data) > max_bytes:
        raise PermanentError(RejectionCode.TOO_LARGE, f"{len(data)} bytes is over the {max_bytes}-byte cap")
    structure = read_jpeg_structure(data, max_pixels=max_pixels)
    facts = ImageFacts(format="JPEG", width=structure.width, height=structure.height, mode=structure.mode)
    if decode:
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) on large images; we decide on pixels ourselves below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            _decode_checked(data, max_pixels)
    return facts


def _decode_checked(data: bytes, max_pixels: int) -> ImageFacts:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise PermanentError(RejectionCode.TOO_MANY_PIXELS, f"the header claims too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise PermanentError(RejectionCode.NOT_AN_IMAGE, "the bytes are not an image Pillow can identify") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise PermanentError(RejectionCode.NOT_AN_IMAGE, f"unreadable image header: {exc}") from exc
    with image:
        if image.format not in JPEG_FORMATS:
            raise PermanentError(RejectionCode.UNSUPPORTED_FORMAT, f"{image.format} image, not JPEG")
        width, height = image.size
        if width * height > max_pixels:
            raise PermanentError(
                RejectionCode.TOO_MANY_PIXELS, f"{width}x{height} is over the {max_pixels}-pixel cap"
            )
        facts = ImageFacts(format="JPEG", width=width, height=height, mode=image.mode)
        _decode_fully(image)
    return facts


def _decode_fully(image: Image.Image) -> None:
    try:
        image.draft("RGB", CHECK_DECODE_SIZE)
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise PermanentError(RejectionCode.TRUNCATED, f"the JPEG stream does not decode: {exc}") from exc


@dataclass(frozen=True)
class Shrunk:
    """A re-encoded, smaller copy of an image, and the sizes before and after."""

    data: bytes
    original: tuple[int, int]
    size: tuple[int, int]


def shrink_for_model(data: bytes, facts: ImageFacts, short_side: int, quality: int = 90) -> Shrunk | None:
    """A copy whose short side is `short_side`, when the image is over twice that; else None (send as is).

    JPEG draft mode decodes at a reduced DCT scale (cheap), EXIF orientation is applied (the copy carries no
    EXIF), and the copy is re-encoded well under gRPC's 4 MB default message limit.
    """
    if min(facts.width, facts.height) <= 2 * short_side:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", _draft_target(facts, short_side))
        upright = ImageOps.exif_transpose(image).convert("RGB")
    scale = short_side / min(upright.size)
    resized = upright.resize((max(1, round(upright.width * scale)), max(1, round(upright.height * scale))),
                             Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG", quality=quality)
    return Shrunk(buffer.getvalue(), (facts.width, facts.height), resized.size)


def _draft_target(facts: ImageFacts, short_side: int) -> tuple[int, int]:
    # Draft picks the smallest DCT scale still at least this large, so the resize below only ever shrinks.
    scale = short_side / min(facts.width, facts.height)
    return max(1, int(facts.width * scale) + 1), max(1, int(facts.height * scale) + 1)
