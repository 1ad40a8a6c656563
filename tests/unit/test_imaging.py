"""The image check: real JPEG bytes pass; everything else gets a specific rejection code."""

import io

import numpy as np
import pytest
from PIL import Image

from worker.errors import PermanentError, RejectionCode
from worker.imaging import check_image, shrink_for_model

LIMITS = {"max_bytes": 16 * 1024 * 1024, "max_pixels": 80_000_000}


def _encode(fmt: str, size: tuple[int, int] = (320, 240), mode: str = "RGB", **options: object) -> bytes:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _code(data: bytes, **limits: int) -> RejectionCode:
    with pytest.raises(PermanentError) as caught:
        check_image(data, **{**LIMITS, **limits})
    return caught.value.code


def test_good_jpegs_pass() -> None:
    facts = check_image(_encode("JPEG"), **LIMITS)
    assert (facts.format, facts.width, facts.height) == ("JPEG", 320, 240)
    assert check_image(_encode("JPEG", mode="L"), **LIMITS).mode == "L"
    assert check_image(_encode("JPEG", mode="CMYK"), **LIMITS).mode == "CMYK"
    assert check_image(_encode("JPEG", progressive=True), **LIMITS).width == 320


def test_empty_and_oversized_bytes() -> None:
    assert _code(b"") is RejectionCode.EMPTY
    assert _code(_encode("JPEG"), max_bytes=100) is RejectionCode.TOO_LARGE


def test_not_an_image() -> None:
    assert _code(b"this is a text file named photo.jpg\n") is RejectionCode.NOT_AN_IMAGE


def test_other_formats_renamed_jpg_are_unsupported() -> None:
    assert _code(_encode("PNG")) is RejectionCode.UNSUPPORTED_FORMAT
    assert _code(_encode("GIF")) is RejectionCode.UNSUPPORTED_FORMAT


def test_truncated_jpeg() -> None:
    data = _encode("JPEG", size=(640, 480))
    assert _code(data[: len(data) // 2]) is RejectionCode.TRUNCATED


def test_pixel_cap_is_checked_from_the_header() -> None:
    assert _code(_encode("JPEG", size=(400, 300)), max_pixels=100_000) is RejectionCode.TOO_MANY_PIXELS


def test_header_claiming_60000_by_60000_is_rejected_before_decoding() -> None:
    data = bytearray(_encode("JPEG", size=(16, 16)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    assert _code(bytes(data)) is RejectionCode.TOO_MANY_PIXELS


def _with_orientation(data: bytes, orientation: int) -> bytes:
    image = Image.open(io.BytesIO(data))
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=90)
    return buffer.getvalue()


def test_large_photos_shrink_upright_when_asked() -> None:
    data = _with_orientation(_encode("JPEG", size=(2000, 1200)), 6)  # stored landscape, shown portrait
    facts = check_image(data, **LIMITS)
    shrunk = shrink_for_model(data, facts, 448)
    assert shrunk is not None
    assert shrunk.original == (2000, 1200)
    assert shrunk.size == (448, 747)  # rotated by the EXIF orientation, short side 448
    assert check_image(shrunk.data, **LIMITS).format == "JPEG"
    assert len(shrunk.data) < len(data)


def test_photos_near_the_model_size_are_sent_as_they_are() -> None:
    data = _encode("JPEG", size=(800, 600))
    assert shrink_for_model(data, check_image(data, **LIMITS), 448) is None


@pytest.mark.parametrize("decode", [False, True])
def test_structure_and_full_decode_agree_on_good_and_truncated_jpegs(decode: bool) -> None:
    data = _encode("JPEG", size=(640, 480), progressive=True)
    assert check_image(data, **LIMITS, decode=decode) == check_image(data, **LIMITS)
    with pytest.raises(PermanentError) as caught:
        check_image(data[: len(data) // 2], **LIMITS, decode=decode)
    assert caught.value.code is RejectionCode.TRUNCATED


def _without_quantisation_tables(data: bytes) -> bytes:
    out, pos = bytearray(data), 2
    while out[pos + 1] != 0xDA:  # header segments up to the first scan
        length = 2 + int.from_bytes(out[pos + 2 : pos + 4], "big")
        if out[pos + 1] == 0xDB:
            del out[pos : pos + length]
        else:
            pos += length
    return bytes(out)


def test_full_decode_also_rejects_a_whole_stream_that_cannot_be_decoded() -> None:
    data = _without_quantisation_tables(_encode("JPEG"))
    # Every marker is in place, so the default structural check passes it (the scoring service would reject it);
    # only decoding finds the scan using a quantisation table the stream never defines.
    assert check_image(data, **LIMITS).width == 320
    with pytest.raises(PermanentError) as caught:
        check_image(data, **LIMITS, decode=True)
    assert caught.value.code is RejectionCode.TRUNCATED
