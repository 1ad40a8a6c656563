"""The JPEG structure check: whole JPEGs of every common kind pass with Pillow's facts; broken ones get their code."""

import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from worker.errors import PermanentError, RejectionCode
from worker.jpeg_structure import JpegStructure, read_jpeg_structure, sniff_format

MAX_PIXELS = 80_000_000
SOF0, DHT, DQT, SOS, COM = 0xC0, 0xC4, 0xDB, 0xDA, 0xFE


def _photo(size: tuple[int, int] = (320, 240), seed: int = 1) -> Image.Image:
    """A photo-like RGB image: smooth gradients plus sensor-like noise (so the entropy data has FF 00 stuffing)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([xs * 255 / size[0], ys * 255 / size[1], (xs + ys) * 127 / sum(size)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _jpeg(size: tuple[int, int] = (320, 240), mode: str = "RGB", **options: object) -> bytes:
    return _encode(_photo(size).convert(mode), "JPEG", **options)


def _with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(exif=exif.tobytes())


def _mpo() -> bytes:
    first, second = _photo(seed=1), _photo(seed=2)
    return _encode(first, "MPO", save_all=True, append_images=[second])


def _segment(data: bytes, marker: int) -> int:
    """The offset of the first header segment with this marker, walking segment lengths from SOI to the scan."""
    pos = 2
    while data[pos + 1] != marker:
        assert data[pos + 1] != SOS, f"no FF{marker:02X} segment before the scan"
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return pos


def _without(data: bytes, marker: int) -> bytes:
    """The JPEG with every header segment of this marker removed."""
    out = bytearray(data)
    pos = 2
    while out[pos + 1] != SOS:
        length = 2 + int.from_bytes(out[pos + 2 : pos + 4], "big")
        if out[pos + 1] == marker:
            del out[pos : pos + length]
        else:
            pos += length
    return bytes(out)


def _code(data: bytes | memoryview, max_pixels: int = MAX_PIXELS) -> tuple[RejectionCode, str]:
    with pytest.raises(PermanentError) as caught:
        read_jpeg_structure(data, max_pixels=max_pixels)
    return caught.value.code, caught.value.message


VALID: dict[str, Callable[[], bytes]] = {
    "baseline": lambda: _jpeg(),
    "progressive": lambda: _jpeg(progressive=True),
    "optimized": lambda: _jpeg(optimize=True, quality=95),
    "greyscale": lambda: _jpeg(mode="L"),
    "cmyk": lambda: _jpeg(mode="CMYK"),
    "exif rotated 6": lambda: _with_orientation(6),
    "exif rotated 8": lambda: _with_orientation(8),
    "mpo": _mpo,
    "restart every block": lambda: _jpeg(restart_marker_blocks=1),
    "restart every row": lambda: _jpeg(restart_marker_rows=1),
    "odd size 4:2:0": lambda: _jpeg(size=(333, 17), subsampling=2),
    "trailing garbage": lambda: _jpeg() + b"\x00\xff\xd8 not part of the image \xff\xff" * 10,
    # MJPEG frames carry no DHT: decoders use the standard's default tables.
    "no huffman tables": lambda: _without(_jpeg(), DHT),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_whole_jpegs_give_pillows_facts(name: str) -> None:
    data = VALID[name]()
    facts = read_jpeg_structure(data, max_pixels=MAX_PIXELS)
    with Image.open(io.BytesIO(data)) as image:
        assert (facts.width, facts.height, facts.mode) == (*image.size, image.mode)
    assert data[facts.eoi_offset : facts.eoi_offset + 2] == b"\xff\xd9"


def test_facts_of_a_baseline_jpeg() -> None:
    data = _jpeg(size=(320, 240))
    assert read_jpeg_structure(data, max_pixels=MAX_PIXELS) == JpegStructure(
        width=320, height=240, components=3, mode="RGB", progressive=False, eoi_offset=len(data) - 2
    )


def test_progressive_jpegs_have_several_scans_walked_to_the_end() -> None:
    data = _jpeg(progressive=True)
    assert data.count(b"\xff\xda") > 1
    facts = read_jpeg_structure(data, max_pixels=MAX_PIXELS)
    assert facts.progressive
    assert facts.eoi_offset == len(data) - 2


def test_greyscale_and_cmyk_components() -> None:
    assert read_jpeg_structure(_jpeg(mode="L"), max_pixels=MAX_PIXELS).components == 1
    assert read_jpeg_structure(_jpeg(mode="CMYK"), max_pixels=MAX_PIXELS).components == 4


def test_restart_markers_inside_the_scan_are_not_its_end() -> None:
    data = _jpeg(restart_marker_blocks=1)
    assert sum(data.count(bytes([0xFF, rst])) for rst in range(0xD0, 0xD8)) > 100
    assert read_jpeg_structure(data, max_pixels=MAX_PIXELS).eoi_offset == len(data) - 2


def test_mpo_passes_on_its_first_frame() -> None:
    data = _mpo()
    assert data.count(b"\xff\xd8\xff") >= 2
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "MPO"
    facts = read_jpeg_structure(data, max_pixels=MAX_PIXELS)
    assert facts.eoi_offset < len(data) - 1000  # the second frame follows the first one's end


def test_bytes_after_the_end_of_image_are_ignored() -> None:
    data = _jpeg()
    facts = read_jpeg_structure(data + b"\xff\xd8\xff\xe0 truncated second image", max_pixels=MAX_PIXELS)
    assert facts.eoi_offset == len(data) - 2


def test_fill_bytes_before_markers_are_allowed() -> None:
    data = _jpeg()
    dqt = _segment(data, DQT)
    filled = data[:dqt] + b"\xff\xff\xff" + data[dqt:-2] + b"\xff\xff\xff\xd9"
    assert read_jpeg_structure(filled, max_pixels=MAX_PIXELS).width == 320


def test_stray_bytes_between_segments_are_skipped_as_decoders_do() -> None:
    data = _jpeg()
    dqt = _segment(data, DQT)
    padded = data[:dqt] + b"\x00\x00junk\xff\x00" + data[dqt:]
    with Image.open(io.BytesIO(padded)) as image:
        image.load()  # libjpeg warns about extraneous bytes and decodes the image
    assert read_jpeg_structure(padded, max_pixels=MAX_PIXELS).height == 240


def test_memoryview_and_bytearray_input() -> None:
    data = _jpeg()
    assert read_jpeg_structure(memoryview(data), max_pixels=MAX_PIXELS).width == 320
    assert read_jpeg_structure(bytearray(data), max_pixels=MAX_PIXELS).width == 320
    assert read_jpeg_structure(memoryview(b"xx" + data)[2:], max_pixels=MAX_PIXELS).width == 320


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_in_the_entropy_data_or_just_before_the_end(progressive: bool) -> None:
    data = _jpeg(size=(640, 480), progressive=progressive)
    for cut in (len(data) // 2, len(data) - 300, len(data) - 2, len(data) - 1):
        code, message = _code(data[:cut])
        assert code is RejectionCode.TRUNCATED, cut
        assert "end-of-image" in message


def test_truncated_in_the_header() -> None:
    data = _jpeg()
    dqt = _segment(data, DQT)
    for cut in (2, 3, 4):  # right after the start-of-image marker, and inside the next marker
        assert _code(data[:cut])[0] is RejectionCode.TRUNCATED, cut
    assert _code(data[:2]) == (RejectionCode.TRUNCATED, "the JPEG stream ends before its end-of-image marker")
    code, message = _code(data[: dqt + 10])
    assert code is RejectionCode.TRUNCATED
    assert f"segment at byte {dqt} (marker FFDB) claims" in message
    assert "past the end of the data" in message
    code, message = _code(data[: dqt + 3])
    assert code is RejectionCode.TRUNCATED
    assert "ends inside the length" in message


def test_a_truncated_frame_followed_by_another_jpeg_is_truncated() -> None:
    first, second = _jpeg(size=(640, 480)), _encode(_photo((640, 480), seed=2))
    code, message = _code(first[: len(first) // 2] + second)
    assert code is RejectionCode.TRUNCATED
    assert "start-of-image" in message


def test_segment_lengths_past_the_end_or_under_two() -> None:
    data = bytearray(_jpeg(size=(64, 48)))
    dqt = _segment(bytes(data), DQT)
    data[dqt + 2 : dqt + 4] = (0xFFFF).to_bytes(2, "big")
    code, message = _code(bytes(data))
    assert code is RejectionCode.TRUNCATED
    assert "claims 65535 bytes" in message
    data[dqt + 2 : dqt + 4] = (1).to_bytes(2, "big")
    code, message = _code(bytes(data))
    assert code is RejectionCode.TRUNCATED
    assert "length 1, shorter than its own 2-byte length field" in message


def _with_size(data: bytes, width: int, height: int) -> bytes:
    patched = bytearray(data)
    sof = _segment(data, SOF0)
    patched[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(patched)


def test_header_claiming_60000_by_60000_is_rejected_before_anything_else() -> None:
    data = _with_size(_jpeg(size=(16, 16)), 60000, 60000)
    sof = _segment(data, SOF0)
    sof_end = sof + 2 + int.from_bytes(data[sof + 2 : sof + 4], "big")
    # Cut right after the frame header: the pixel cap is decided before the missing rest is noticed.
    assert _code(data[:sof_end])[0] is RejectionCode.TOO_MANY_PIXELS
    code, message = _code(data)
    assert code is RejectionCode.TOO_MANY_PIXELS
    assert message == f"60000x60000 is over the {MAX_PIXELS}-pixel cap"
    assert _code(_jpeg(size=(400, 300)), max_pixels=100_000)[0] is RejectionCode.TOO_MANY_PIXELS


def test_zero_width_or_height() -> None:
    data = _jpeg(size=(16, 16))
    code, message = _code(_with_size(data, 0, 16))
    assert (code, message) == (RejectionCode.NOT_AN_IMAGE, "the frame header gives a width of 0")
    code, message = _code(_with_size(data, 16, 0))
    assert code is RejectionCode.NOT_AN_IMAGE
    assert "height of 0" in message


def test_two_component_frame_is_not_an_image() -> None:
    data = bytearray(_jpeg(mode="L"))
    sof = _segment(bytes(data), SOF0)
    data[sof + 9] = 2
    code, message = _code(bytes(data))
    assert code is RejectionCode.NOT_AN_IMAGE
    assert "2 colour components" in message


def test_scan_without_frame_header() -> None:
    code, message = _code(_without(_jpeg(), SOF0))
    assert code is RejectionCode.NOT_AN_IMAGE
    assert "no frame header" in message


def test_no_frame_header_at_all_or_no_scan() -> None:
    comment_only = b"\xff\xd8\xff\xfe\x00\x07hello\xff\xd9"
    assert _code(comment_only) == (RejectionCode.NOT_AN_IMAGE, "the JPEG has no frame header (no SOF marker)")
    data = _jpeg()
    header_only = data[: _segment(data, SOS)] + b"\xff\xd9"
    assert _code(header_only) == (RejectionCode.NOT_AN_IMAGE, "the JPEG has a frame header but no scan data")


def test_malformed_scan_header() -> None:
    data = bytearray(_jpeg())
    sos = _segment(bytes(data), SOS)
    data[sos + 4] = 7  # seven components in a scan
    assert _code(bytes(data))[0] is RejectionCode.TRUNCATED


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "PNG"), ("GIF", "GIF"), ("WEBP", "WEBP"), ("BMP", "BMP"),
                                           ("TIFF", "TIFF")])
def test_other_image_formats_are_unsupported(fmt: str, name: str) -> None:
    code, message = _code(_encode(_photo((32, 24)), fmt))
    assert (code, message) == (RejectionCode.UNSUPPORTED_FORMAT, f"{name} image, not JPEG")


@pytest.mark.parametrize(("brand", "name"), [(b"heic", "HEIC"), (b"avif", "AVIF"), (b"mif1", "HEIF")])
def test_heic_and_avif_are_unsupported(brand: bytes, name: str) -> None:
    data = b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00mif1heic" + bytes(100)
    assert _code(data) == (RejectionCode.UNSUPPORTED_FORMAT, f"{name} image, not JPEG")


def test_tiff_big_endian_signature() -> None:
    assert sniff_format(b"MM\x00*\x00\x00\x00\x08") == "TIFF"
    assert sniff_format(b"\x00\x00\x00\x18ftypisom") is None  # an MP4 video


def test_random_bytes_and_text_are_not_an_image() -> None:
    rng = np.random.default_rng(7)
    noise = b"\x00" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert _code(noise)[0] is RejectionCode.NOT_AN_IMAGE
    assert _code(b"this is a text file named photo.jpg\n")[0] is RejectionCode.NOT_AN_IMAGE
    assert _code(b"\xff\xd8\x00 starts like a JPEG")[0] is RejectionCode.NOT_AN_IMAGE


@pytest.mark.parametrize("seed", range(5))
def test_jpeg_signature_then_noise_is_rejected(seed: int) -> None:
    noise = np.random.default_rng(seed).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    assert _code(b"\xff\xd8\xff" + noise)[0] in {RejectionCode.TRUNCATED, RejectionCode.NOT_AN_IMAGE}


def test_empty() -> None:
    assert _code(b"") == (RejectionCode.EMPTY, "the blob is empty")
