"""Hostile input: a corpus of bad and unusual images (real model behind the stand-in), and hostile blob names.

Each test runs a job through real processes and ends with a tally: nothing lost, nothing doubled.
"""

from __future__ import annotations

import http.client
import io
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from fault_helpers import Processes, assert_clean, start_worker
from PIL import Image
from shared_helpers import jpeg_bytes

from deploy.local.azurite import AZURITE_ACCOUNT, AZURITE_KEY
from producer.samples import sample_photos

Report = Callable[[dict[str, Any]], None]
MAX_IMAGE_BYTES = 300_000
CAT_CLASSES = {281, 282, 283, 284, 285}


def _save(image: Image.Image, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def _with_frame_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its SOF header claiming another size (nothing else changed)."""
    index = 2
    while index < len(jpeg):
        marker, length = jpeg[index + 1], int.from_bytes(jpeg[index + 2 : index + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            patched = bytearray(jpeg)
            patched[index + 5 : index + 7] = height.to_bytes(2, "big")
            patched[index + 7 : index + 9] = width.to_bytes(2, "big")
            return bytes(patched)
        index += 2 + length
    raise ValueError("no SOF marker")


def hostile_corpus() -> tuple[dict[str, bytes], dict[str, str]]:
    """(blobs, expected rejection code per bad blob); every other blob must be scored `ok`."""
    photos = sample_photos()
    cat = Image.open(io.BytesIO(photos["chelsea.jpg"]))
    cat.load()
    small = _save(cat.resize((200, 150)), format="JPEG", quality=85)
    exif_6, exif_8 = Image.Exif(), Image.Exif()
    exif_6[0x0112], exif_8[0x0112] = 6, 8  # Orientation: stored rotated, displayed upright
    noise = Image.fromarray(np.random.default_rng(3).integers(0, 255, (900, 900, 3), dtype=np.uint8))
    bad = {
        "bad/claims-60000x60000.jpg": (_with_frame_size(small, 60000, 60000), "too_many_pixels"),
        "bad/claims-10000x9000.jpg": (_with_frame_size(small, 10000, 9000), "too_many_pixels"),
        "bad/truncated.jpg": (photos["coffee.jpg"][: len(photos["coffee.jpg"]) // 2], "truncated"),
        "bad/png-named.jpg": (_save(cat, format="PNG"), "unsupported_format"),
        "bad/gif-named.JPG": (_save(cat.convert("P"), format="GIF"), "unsupported_format"),
        "bad/empty.jpg": (b"", "empty"),
        "bad/over-the-cap.jpg": (_save(noise, format="JPEG", quality=98), "too_large"),
        "bad/text.jpeg": (b"not an image at all\n", "not_an_image"),
    }
    good = {
        "good/chelsea-cmyk.jpg": _save(cat.convert("CMYK"), format="JPEG", quality=90),
        "good/chelsea-grey.jpg": _save(cat.convert("L"), format="JPEG", quality=90),
        "good/chelsea-progressive.jpg": _save(cat, format="JPEG", quality=90, progressive=True),
        "good/chelsea-exif6.jpg": _save(cat.rotate(90, expand=True), format="JPEG", quality=90, exif=exif_6),
        "good/chelsea-exif8.jpg": _save(cat.rotate(-90, expand=True), format="JPEG", quality=90, exif=exif_8),
        "good/chelsea-mpo.jpg": _save(cat, format="MPO", save_all=True,
                                      append_images=[cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]),
        "good/coffee.jpg": photos["coffee.jpg"],
    }
    assert all(len(data) <= MAX_IMAGE_BYTES for data in good.values())
    assert len(bad["bad/over-the-cap.jpg"][0]) > 2 * MAX_IMAGE_BYTES
    blobs = {**{name: data for name, (data, _) in bad.items()}, **good}
    return blobs, {name: code for name, (_, code) in bad.items()}


@pytest.mark.timeout(150)
def test_hostile_image_corpus_gets_specific_rejections_and_the_good_ones_are_scored(
    make_job: Any, procs: Processes, fault_report: Report
) -> None:
    """Scenario 12, with the real model (EfficientNet-Lite0) behind the stand-in."""
    job = make_job(extra={"BLOBSCORE_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES), "BLOBSCORE_SCORING_TIMEOUT_S": "5"})
    job.start_standin(procs, no_model=False)
    blobs, expected_codes = hostile_corpus()
    job.upload(blobs)
    start_worker(procs, job.env, job.workdir / "worker.log", concurrency=2)
    job.enqueue()
    job.wait_done(90)
    results = job.results()
    tally = job.tally(top_label={name: f"{doc['labels'][0]['label']} {doc['labels'][0]['score']:.2f}"
                                 for name, doc in results.items() if doc["status"] == "ok"})
    fault_report(tally)
    assert_clean(tally)
    codes = {name: doc["error"]["code"] for name, doc in results.items() if doc["status"] == "rejected"}
    assert codes == expected_codes
    calls = job.scorer_calls()
    for name in blobs:
        if name in expected_codes:
            assert calls[name] == 0, f"{name} reached the scorer"
            continue
        doc = results[name]
        assert doc["status"] == "ok", (name, doc)
        assert len(doc["labels"]) == 5
        assert calls[name] == 1
    assert results["good/coffee.jpg"]["labels"][0]["label"] == "espresso"
    for variant in ("cmyk", "grey", "progressive", "exif6", "exif8", "mpo"):
        top = {label["class_id"] for label in results[f"good/chelsea-{variant}.jpg"]["labels"][:3]}
        assert top & CAT_CLASSES, (variant, results[f"good/chelsea-{variant}.jpg"]["labels"])


def _sas_put(port: int, container: str, encoded_name: str, data: bytes) -> None:
    """Upload with an already percent-encoded name, bypassing the SDK (which cannot send a `..` segment: the HTTP
    stack collapses it). Azurite then stores the blob under the decoded name, e.g. `../x.jpg`."""
    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    sas = generate_account_sas(
        AZURITE_ACCOUNT, AZURITE_KEY, ResourceTypes(object=True), AccountSasPermissions(write=True, create=True),
        expiry=datetime.now(UTC) + timedelta(minutes=10),
    )
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("PUT", f"/{AZURITE_ACCOUNT}/{container}/{encoded_name}?{sas}", body=data,
                           headers={"x-ms-blob-type": "BlockBlob", "Content-Type": "image/jpeg"})
        reply = connection.getresponse()
        assert reply.status == 201, (reply.status, reply.read())
    finally:
        connection.close()


def hostile_names(results_prefix: str) -> list[str]:
    """Blob names that have broken naive code: traversal, encodings, length, bidi, spaces, URL syntax."""
    longest = 1024 - len(results_prefix) - len(".json")  # the longest source name whose result name is legal
    return [
        "%2e%2e/y.jpg",
        "%2E%2E%2Fz.jpg",
        "a%20b.jpg",
        "with space/a  b .jpg",
        " leading-space.jpg",
        "q?x=1&y=2#frag;.jpg",
        "ünïcødé/日本語の写真.jpg",
        "emoji/📷 photo.jpg",
        "rtl/\u202egpj.exe\u202c.jpg",
        "עברית/תמונה.jpg",
        "deep/" * 40 + "n.jpg",
        "l/" + "x" * (longest - len("l/") - len(".jpg")) + ".jpg",
    ]


@pytest.mark.timeout(90)
def test_hostile_blob_names_each_get_exactly_one_result_at_the_expected_name(
    make_job: Any, procs: Processes, fault_report: Report
) -> None:
    """Scenario 13. Every name gets its one result at `<results prefix><name>.json`, written once."""
    job = make_job()
    job.start_standin(procs)
    names = hostile_names(job.results_prefix)
    job.upload({name: jpeg_bytes(2000 + index) for index, name in enumerate(names)})
    start_worker(procs, job.env, job.workdir / "worker.log", concurrency=2)
    job.enqueue()
    job.wait_done(60)
    tally = job.tally()
    fault_report(tally)
    assert_clean(tally)
    results = job.results()
    assert set(results) == set(names)
    assert {name: doc["status"] for name, doc in results.items()} == dict.fromkeys(names, "ok")
    assert {name: doc["source"]["blob"] for name, doc in results.items()} == {name: name for name in names}


@pytest.mark.timeout(60)
def test_names_whose_result_cannot_be_addressed_get_a_record_under_the_results_prefix(
    make_job: Any, procs: Processes, fault_report: Report, faults_azurite: Any
) -> None:
    """Scenario 13, the names no result can be written for. `../x.jpg` and `a/./b.jpg` exist in Azurite (uploaded
    percent-encoded) but not in Azure Storage, which collapses dot segments, and the SDK's HTTP stack collapses them
    too, so neither the source nor `<prefix>../x.jpg.json` can be addressed; a 1024-character source name (legal)
    makes its result name longer than the 1024 characters a blob name may have in Azure Storage (Azurite does not
    enforce that limit). Each gets one `rejected` record (`unaddressable_name`) under the results prefix, at a name
    derived from a hash of the source name, the job ends, and nothing is written anywhere else."""
    job = make_job()
    job.start_standin(procs)
    dotted = {"../x.jpg": "%2E%2E/x.jpg", "a/./b.jpg": "a/%2E/b.jpg"}
    for index, (name, encoded) in enumerate(dotted.items()):
        data = jpeg_bytes(2100 + index)
        _sas_put(faults_azurite.port, job.container, encoded, data)
        job.uploads[name] = data
    too_long = "L/" + "y" * (1024 - len("L/") - len(".jpg")) + ".jpg"
    job.upload({too_long: jpeg_bytes(2199)})
    container = job.blob_service.get_container_client(job.container)
    sources = {blob.name for blob in container.list_blobs()}
    assert sources == {*dotted, too_long}, "the emulator did not store the names as given"
    start_worker(procs, job.env, job.workdir / "worker.log", concurrency=2)
    job.enqueue()
    job.wait_done(30)
    written = sorted(blob.name for blob in container.list_blobs() if blob.name not in sources)
    outside = [name for name in written if not name.startswith(job.results_prefix)]
    tally = job.tally(written_outside_the_results_prefix=outside)
    fault_report(tally)
    assert not outside, outside
    assert_clean(tally)
    results = job.results()
    assert {name: (doc["status"], doc["error"]["code"]) for name, doc in results.items()} == dict.fromkeys(
        [*dotted, too_long], ("rejected", "unaddressable_name")
    )
    assert {doc["source"]["blob"] for doc in results.values()} == {*dotted, too_long}
    # Nothing was downloaded or scored for them.
    assert set(job.scorer_calls().values()) == {0}
