"""`blobscore report` on the real stack, opened in headless Chromium: every image is on the page, nothing is fetched."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from PIL import Image
from pipeline_helpers import blobscore_env, start_standin, start_worker, wait_until_done
from shared_helpers import jpeg_bytes, run_cli, run_cli_json

from deploy.standin.ssd_replay import KnownBox, write_replay
from producer.report import CSP
from producer.samples import sample_photos
from worker.contracts import ResultDoc

pytestmark = pytest.mark.integration

KEY = "report-secret-key"
# Blob names are user data: this one must come out as text, never as markup.
HOSTILE = "odd <b>bold</b> & \"quoted\" 'name'.jpg"
CHROMIUM_TIMEOUT_S = 90
# Net-log initiator of the requests Chromium makes on its own (updates, time, spelling): not the page's.
BROWSER_INITIATOR = "not an origin"
# Boxes the replayed SSD tensors encode for every image: (y1, x1, y2, x2) fractions.
KNOWN_BOXES = (
    KnownBox(class_id=8, score=0.93, box=(0.10, 0.20, 0.80, 0.75)),  # cat
    KnownBox(class_id=15, score=0.71, box=(0.05, 0.55, 0.45, 0.95)),  # person
)
LEAKY_PAGE = ('<!DOCTYPE html><html><body><img src="http://leak.invalid/pixel.png">'
              '<link rel="stylesheet" href="https://fonts.invalid/font.css"></body></html>')


def _sideways_photo() -> bytes:
    # Stored 320x160 with EXIF orientation 6: the thumbnail must come out upright (80x160).
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(7, (320, 160), exif=exif)


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("this test needs headless Chromium: run scripts/ensure-tools.sh (apt-get install chromium)",
                    pytrace=False)
    return path


def run_chromium(workdir: Path, url: str, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Headless Chromium on `url` with DNS mapped to nowhere and a net log; returns the run and the log's path."""
    net_log = workdir / f"netlog-{uuid.uuid4().hex[:8]}.json"
    argv = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={workdir / 'chromium-profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--disable-background-networking", f"--log-net-log={net_log}", *args, url,
    ]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False)
    assert completed.returncode == 0, f"chromium failed ({' '.join(argv)}):\n{completed.stderr[-3000:]}"
    return completed, net_log


def page_requests(net_log: Path) -> list[str]:
    """URLs the page itself asked the network stack for (Chromium's own background requests left out)."""
    log = json.loads(net_log.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        event["params"]["url"] for event in log["events"]
        if event["type"] == start_job and "url" in event.get("params", {})
        and event["params"].get("initiator") != BROWSER_INITIATOR
    ]


@dataclass
class _Element:
    name: list[str] = field(default_factory=list)
    values: list[str] = field(default_factory=list)
    boxes: list[str] = field(default_factory=list)


class DomReader(HTMLParser):
    """Cards (name, labels, box styles, image sources) and rejected rows (name, code) of a dumped report DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[_Element] = []
        self.rejected: list[_Element] = []
        self.card_images: list[str] = []
        self.csp: list[str] = []
        self._current: _Element | None = None
        self._field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "meta" and attributes.get("http-equiv") == "Content-Security-Policy":
            self.csp.append(attributes.get("content") or "")
        if tag == "figure" and "card" in classes:
            self._current = _Element()
            self.cards.append(self._current)
        elif tag == "tr" and "rejected" in classes:
            self._current = _Element()
            self.rejected.append(self._current)
        elif tag == "img" and self._current is not None:
            self.card_images.append(attributes.get("src") or "")
        elif tag == "div" and "box" in classes and self._current is not None:
            self._current.boxes.append(attributes.get("style") or "")
        if self._current is not None:
            self._field = "name" if "name" in classes else "value" if ("lab" in classes or tag == "code") else None

    def handle_endtag(self, tag: str) -> None:
        self._field = None
        if tag in ("figure", "tr"):
            self._current = None

    def handle_data(self, data: str) -> None:
        if self._current is not None and self._field == "name":
            self._current.name.append(data)
        elif self._current is not None and self._field == "value":
            self._current.values.append(data)


@contextmanager
def score_and_report(
    workdir: Path, redis_url: str, azurite: Any, blob_service: BlobServiceClient, blobs: dict[str, bytes],
    model: str, *standin_args: str,
) -> Iterator[dict[str, Any]]:
    """Score `blobs` on the real stack (a stand-in of `model`, one worker), run `blobscore report`, yield it all."""
    service = f"report-{model.replace('_', '-')}"
    standin, port = start_standin(workdir, "--model", model, "--service-name", service, *standin_args, key=KEY)
    container_name = f"report-{uuid.uuid4().hex[:12]}"
    container = blob_service.create_container(container_name)
    for name, data in blobs.items():
        container.upload_blob(name, data, overwrite=True)
    env = blobscore_env(broker_url=redis_url, connection_string=azurite.connection_string,
                        scoring_port=port, key=KEY, service_name=service, model=model)
    worker = start_worker(env, workdir / "worker.log")
    try:
        job_id = run_cli_json(env, workdir, "enqueue", "--container", container_name)["job_id"]
        status = wait_until_done(env, workdir, job_id)
        page = workdir / "out.html"
        run_cli(env, workdir, "report", job_id, "--html", str(page))
        docs = [ResultDoc.from_json(line.encode("utf-8"))
                for line in run_cli(env, workdir, "results", job_id).splitlines() if line]
        yield {"env": env, "cwd": workdir, "job_id": job_id, "status": status, "page": page, "docs": docs,
               "blobs": blobs}
    finally:
        worker.stop()
        standin.stop()


@pytest.fixture(scope="module")
def reported_job(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, azurite: Any, blob_service: BlobServiceClient
) -> Iterator[dict[str, Any]]:
    """A small classification job (fast stand-in, a sideways photo, a hostile name, one bad file) and its page."""
    blobs = {**sample_photos(), "sideways.jpg": _sideways_photo(), HOSTILE: jpeg_bytes(3, (200, 150)),
             "bad/notes.jpg": b"a text file with a .jpg name\n"}
    with score_and_report(tmp_path_factory.mktemp("report"), redis_url, azurite, blob_service, blobs,
                          "resnet50", "--no-model", "--emulate-latency-ms", "5") as job:
        yield job


def test_every_image_is_in_the_browser_dom_with_its_label_or_rejection(
    reported_job: dict[str, Any], tmp_path: Path
) -> None:
    docs: list[ResultDoc] = reported_job["docs"]
    assert len(docs) == len(reported_job["blobs"]) == reported_job["status"]["listed"]
    dumped, _ = run_chromium(tmp_path, reported_job["page"].as_uri(), "--dump-dom")
    dom = DomReader()
    dom.feed(dumped.stdout)
    cards = {"".join(card.name): card.values for card in dom.cards}
    rows = {"".join(row.name): row.values for row in dom.rejected}
    ok = [doc for doc in docs if doc.status == "ok"]
    rejected = [doc for doc in docs if doc.status == "rejected"]
    assert rejected
    assert ok
    assert set(cards) == {doc.source.blob for doc in ok}
    for doc in ok:
        assert doc.labels, doc
        assert cards[doc.source.blob][0] == doc.labels[0].label
    assert rows == {doc.source.blob: [doc.error.code if doc.error else ""] for doc in rejected}
    assert rows["bad/notes.jpg"] == ["not_an_image"]
    assert HOSTILE in cards  # shown as text, so the DOM holds it back verbatim
    # Every card got a thumbnail, embedded.
    assert len(dom.card_images) == len(ok)
    assert all(src.startswith("data:image/jpeg;base64,") for src in dom.card_images)
    assert dom.csp == [CSP]


def test_the_page_fetches_nothing(reported_job: dict[str, Any], tmp_path: Path) -> None:
    page = reported_job["page"].read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    without_thumbnails = re.sub(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", "data:", page)
    assert not re.search(r"https?:|ftp:|//[a-z0-9]|url\(|@import", without_thumbnails, re.IGNORECASE)
    _, net_log = run_chromium(tmp_path, reported_job["page"].as_uri(), "--dump-dom")
    assert page_requests(net_log) == []
    # The same check does see a page that fetches something: it is not vacuous.
    leaky = tmp_path / "leaky.html"
    leaky.write_text(LEAKY_PAGE)
    _, leaky_log = run_chromium(tmp_path, leaky.as_uri(), "--dump-dom")
    assert sorted(page_requests(leaky_log)) == ["http://leak.invalid/pixel.png", "https://fonts.invalid/font.css"]


def test_screenshot_of_the_page(reported_job: dict[str, Any], tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    run_chromium(tmp_path, reported_job["page"].as_uri(), f"--screenshot={shot}", "--window-size=1280,2000")
    with Image.open(shot) as image:
        assert image.format == "PNG"
        assert image.size == (1280, 2000)
        # A blank page would be one colour; the report has thumbnails and text.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 1000
    print(f"report screenshot: {shot}", file=sys.stderr)


def test_report_of_an_unknown_job_is_one_line_and_exit_2(reported_job: dict[str, Any], tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "producer.cli", "report", "no-such-job", "--html", str(tmp_path / "x.html")],
        env=reported_job["env"], cwd=reported_job["cwd"], capture_output=True, text=True, timeout=60, check=False,
    )
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.startswith("error: ")
    assert len(completed.stderr.strip().splitlines()) == 1
    assert "no-such-job" in completed.stderr
    assert not (tmp_path / "x.html").exists()


def test_ssd_detections_are_boxes_over_each_thumbnail(
    tmp_path: Path, redis_url: str, azurite: Any, blob_service: BlobServiceClient
) -> None:
    replay = tmp_path / "ssd.npz"
    write_replay(replay, KNOWN_BOXES)
    photos = sample_photos()
    blobs = {name: photos[name] for name in ("chelsea.jpg", "coffee.jpg")}
    with score_and_report(tmp_path, redis_url, azurite, blob_service, blobs, "ssd_vgg", "--replay",
                          str(replay)) as job:
        page = job["page"]
    dumped, _ = run_chromium(tmp_path, page.as_uri(), "--dump-dom")
    dom = DomReader()
    dom.feed(dumped.stdout)
    assert sorted("".join(card.name) for card in dom.cards) == sorted(blobs)
    # left, top, width, height in percent of the thumbnail, from (y1, x1, y2, x2) fractions.
    expected = [pytest.approx([100 * x1, 100 * y1, 100 * (x2 - x1), 100 * (y2 - y1)], abs=0.05)
                for y1, x1, y2, x2 in (known.box for known in KNOWN_BOXES)]
    for card in dom.cards:
        assert card.values == ["cat", "person"]
        assert [box_percentages(style) for style in card.boxes] == expected
    run_chromium(tmp_path, page.as_uri(), f"--screenshot={tmp_path / 'ssd.png'}", "--window-size=1280,900")


def box_percentages(style: str) -> list[float]:
    """left, top, width, height of a box's inline style, in percent."""
    values = dict(re.findall(r"(left|top|width|height):\s*([\d.]+)%", style))
    return [float(values[name]) for name in ("left", "top", "width", "height")]
