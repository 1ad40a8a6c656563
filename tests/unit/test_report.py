"""The HTML report: every image and rejection on the page, escaped, nothing fetched, bounded in size."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from producer.report import CSP, MAX_REPORT_BYTES, MAX_THUMB_BYTES, make_thumbnail, render_report
from producer.report_figures import histogram, percentile, select_images, summarize
from worker.contracts import DetectionDoc, ErrorDoc, LabelDoc, ResultDoc, ServiceRef, SourceRef
from worker.jobs import JobSpec, JobStatus

HOSTILE = "<script>alert(1)</script>.jpg"
SPEC = JobSpec("photos", "2026/", "local", "photos", "blobscore-results/local/")


def _ok(name: str, label: str = "tabby", score: float = 0.9, second: int = 0, score_ms: float = 20.0) -> ResultDoc:
    return ResultDoc(
        status="ok", job_id="j1", source=SourceRef(container="photos", blob=name, etag="0x1", size=1000),
        service=ServiceRef(name="local", model="resnet50"),
        labels=[LabelDoc(class_id=281, label=label, score=score),
                LabelDoc(class_id=282, label="tiger cat", score=0.05)],
        scored_at=f"2026-01-01T10:{second // 60:02d}:{second % 60:02d}.000Z",
        timings_ms={"download": 3.0, "score": score_ms},
    )


def _rejected(name: str, code: str = "not_an_image", message: str = "not an image") -> ResultDoc:
    return ResultDoc(
        status="rejected", job_id="j1", source=SourceRef(container="photos", blob=name, etag="0x2", size=10),
        service=ServiceRef(name="local", model="resnet50"), error=ErrorDoc(code=code, message=message),
        scored_at="2026-01-01T10:00:05.000Z", timings_ms={"download": 1.0},
    )


def _status(ok: int, rejected: int) -> JobStatus:
    return JobStatus("j1", ok + rejected, ok, rejected, 0, 0, "done")


def _photo(seed: int, size: tuple[int, int] = (640, 480), exif: Image.Exif | None = None) -> bytes:
    # Noise compresses badly: a worst case for the thumbnail's size.
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, exif=exif or Image.Exif())
    return buffer.getvalue()


class _Cards(HTMLParser):
    """Card names and labels, rejected rows' names and codes, and every tag and attribute name seen."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict[str, list[str]]] = []
        self.rejected: list[dict[str, list[str]]] = []
        self.tags: set[str] = set()
        self.attributes: set[str] = set()
        self.images = 0
        self._field: str | None = None
        self._in: dict[str, list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)
        classes = (dict(attrs).get("class") or "").split()
        if tag == "figure" and "card" in classes:
            self._in = {"name": [], "lab": []}
            self.cards.append(self._in)
        elif tag == "tr" and "rejected" in classes:
            self._in = {"name": [], "code": []}
            self.rejected.append(self._in)
        elif tag == "img":
            self.images += 1
        if self._in is not None:
            self._field = next((c for c in classes if c in self._in), None) or ("code" if tag == "code" else None)

    def handle_endtag(self, tag: str) -> None:
        self._field = None
        if tag in ("figure", "tr"):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in is not None and self._field in self._in:
            self._in[self._field].append(data)


def _parse(page: str) -> _Cards:
    parser = _Cards()
    parser.feed(page)
    return parser


def _small_job() -> tuple[list[ResultDoc], dict[str, bytes]]:
    docs = [_ok("a.jpg", second=0), _ok(HOSTILE, label='<img src=x onerror="alert(2)">', second=10),
            _ok("b & c.jpg", label="ant", second=20), _rejected("bad.jpg"),
            _rejected("<b>bold</b>.jpg", "truncated", "the JPEG stream does not decode: <oops>")]
    thumbs = {doc.source.blob: thumb for doc in docs if (thumb := make_thumbnail(_photo(1))) is not None}
    return docs, thumbs


def test_every_image_and_rejection_appears_with_its_labels_and_code() -> None:
    docs, thumbs = _small_job()
    parsed = _parse(render_report(_status(3, 2), docs, thumbs, spec=SPEC))
    cards = {"".join(card["name"]): card["lab"] for card in parsed.cards}
    assert cards == {"a.jpg": ["tabby", "tiger cat"], HOSTILE: ['<img src=x onerror="alert(2)">', "tiger cat"],
                     "b & c.jpg": ["ant", "tiger cat"]}
    rejected = {"".join(row["name"]): "".join(row["code"]) for row in parsed.rejected}
    assert rejected == {"bad.jpg": "not_an_image", "<b>bold</b>.jpg": "truncated"}
    assert parsed.images == 3


def test_user_data_is_escaped_and_the_page_can_run_nothing() -> None:
    docs, thumbs = _small_job()
    page = render_report(_status(3, 2), docs, thumbs, spec=SPEC)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in page
    assert 'onerror="' not in page  # only as escaped text: onerror=&quot;
    assert "&lt;b&gt;bold&lt;/b&gt;.jpg" in page
    assert "&lt;oops&gt;" in page
    assert "b &amp; c.jpg" in page
    parsed = _parse(page)
    assert {"script", "iframe", "object", "embed", "link", "form", "base"}.isdisjoint(parsed.tags)
    assert not [name for name in parsed.attributes if name.startswith("on")]


def test_csp_forbids_everything_but_data_images_and_inline_style() -> None:
    page = render_report(_status(3, 2), *_small_job(), spec=SPEC)
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP.replace(chr(39), "&#x27;")}">' in page
    assert "default-src 'none'" in CSP
    assert "img-src data:" in CSP
    assert "style-src 'unsafe-inline'" in CSP
    assert page.index("Content-Security-Policy") < page.index("<style>")


def test_no_network_url_anywhere() -> None:
    page = render_report(_status(3, 2), *_small_job(), spec=SPEC)
    # Base64 may hold any letters, "//" included: look at everything but the embedded thumbnails.
    text = re.sub(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", "data:", page)
    assert not re.search(r"https?:|//[a-z0-9]|url\(|@import|ftp:|file:", text, re.IGNORECASE)
    assert set(re.findall(r'src="([a-z]+):', page)) == {"data"}


def test_summary_figures() -> None:
    docs = [_ok(f"{i}.jpg", score=i / 10, second=i, score_ms=float(i + 1)) for i in range(10)]
    summary = summarize([*docs, _rejected("x.jpg"), _rejected("y.jpg", "empty")])
    assert summary.duration_s == 9.0
    assert summary.images_per_s == pytest.approx(11 / 9)  # 12 results, 11 gaps, 9 s
    assert summary.latency_ms == {"p50": 5.0, "p90": 9.0, "p99": 10.0}
    assert summary.histogram == [1] * 10
    assert summary.frequent == [("tabby", 10)]
    assert dict(summary.codes) == {"not_an_image": 1, "empty": 1}
    assert histogram([0.0, 0.05, 1.0, 0.999]) == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    # Two results a few milliseconds apart say nothing about a rate.
    quick = summarize([_ok("a.jpg"), _ok("b.jpg").model_copy(update={"scored_at": "2026-01-01T10:00:00.004Z"})])
    assert quick.duration_s == pytest.approx(0.004, abs=1e-5)
    assert quick.images_per_s is None


def test_summary_appears_on_the_page() -> None:
    docs = [_ok(f"{i}.jpg", label="dog" if i % 3 else "cat", second=i) for i in range(7)]
    page = render_report(_status(7, 0), docs, {}, spec=SPEC)
    for text in ("listed", "images/s", "score p50", "score p90", "score p99", "Top-1 score",
                 "Most frequent top-1 labels", "photos/2026/", "No image was rejected", "no preview"):
        assert text in page
    assert "Images (7 scored)" in page
    assert "sample" not in page  # a small job shows every image, with no note


def test_detections_are_boxes_over_the_thumbnail() -> None:
    detection = DetectionDoc(class_id=12, label="dog <pup>", score=0.8, box=[0.1, 0.2, 0.6, 0.9], box_px=[])
    doc = _ok("ssd.jpg").model_copy(update={"labels": None, "detections": [detection]})
    thumb = make_thumbnail(_photo(2))
    assert thumb is not None
    page = render_report(_status(1, 0), [doc], {"ssd.jpg": thumb})
    assert 'style="left:20.00%;top:10.00%;width:70.00%;height:50.00%' in page
    assert "dog &lt;pup&gt; 0.80" in page
    assert [card["lab"] for card in _parse(page).cards] == [["dog <pup>"]]


def test_large_job_shows_first_images_and_a_fixed_sample_under_the_size_bound() -> None:
    total = 3000
    docs = [_ok(f"img/{i:05d}.jpg", second=i % 3600) for i in range(total)] + [_rejected(f"bad/{i}.jpg")
                                                                             for i in range(1500)]
    # One worst-case (noise) thumbnail for every card: the page's size is then all thumbnails.
    thumb = make_thumbnail(_photo(3))
    assert thumb is not None
    thumbs = {doc.source.blob: thumb for doc in docs}
    selection = select_images(docs)
    assert (selection.first, selection.sampled, selection.total) == (500, 500, total)
    assert [doc.source.blob for doc in selection.shown[:500]] == [f"img/{i:05d}.jpg" for i in range(500)]
    assert selection.shown == select_images(list(reversed(docs))).shown  # deterministic
    page = render_report(_status(total, 1500), docs, thumbs, selection=selection)
    parsed = _parse(page)
    assert len(parsed.cards) == 1000
    assert len(parsed.rejected) == 1000
    assert "first 500 by name and a deterministic sample of 500 of the other 2500" in page
    assert "500 more are counted by code" in page
    assert len(page.encode("utf-8")) < MAX_REPORT_BYTES


def test_up_to_a_thousand_images_are_all_shown_without_a_note() -> None:
    docs = [_ok(f"{i:04d}.jpg") for i in range(1000)]
    selection = select_images(docs)
    assert [doc.source.blob for doc in selection.shown] == [doc.source.blob for doc in docs]
    page = render_report(_status(1000, 0), docs, {})
    assert len(_parse(page).cards) == 1000
    assert "sample" not in page


def test_largest_thumbnails_never_break_the_documented_bound() -> None:
    # 1000 cards of thumbnails at the per-thumbnail cap would be ~27 MB: the last cards give way instead.
    docs = [_ok(f"{i:04d}.jpg") for i in range(1000)]
    thumbs = {doc.source.blob: bytes([i % 251]) * MAX_THUMB_BYTES for i, doc in enumerate(docs)}
    page = render_report(_status(1000, 0), docs, thumbs)
    assert len(page.encode("utf-8")) <= MAX_REPORT_BYTES
    assert "more cards were left out to keep this file under 25 MB" in page
    assert len(_parse(page).cards) > 900


def test_cards_are_dropped_rather_than_break_the_size_bound() -> None:
    thumb = make_thumbnail(_photo(4))
    assert thumb is not None
    docs = [_ok(f"{i}.jpg") for i in range(200)]
    bound = 500_000
    page = render_report(_status(200, 0), docs, dict.fromkeys((d.source.blob for d in docs), thumb), max_bytes=bound)
    assert len(page.encode("utf-8")) <= bound
    shown = len(_parse(page).cards)
    assert 0 < shown < 200
    assert f"{200 - shown} more cards were left out to keep this file under 0.5 MB" in page


def test_thumbnail_is_small_upright_and_jpeg() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown after a 90° turn
    thumb = make_thumbnail(_photo(5, size=(640, 320), exif=exif))
    assert thumb is not None
    assert len(thumb) <= MAX_THUMB_BYTES
    with Image.open(io.BytesIO(thumb)) as image:
        assert image.format == "JPEG"
        assert image.size == (80, 160)
    assert make_thumbnail(b"not an image") is None
    assert make_thumbnail(_photo(6)[:300]) is None
