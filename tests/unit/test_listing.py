"""Which blobs the producer queues."""

from producer.listing import current_results, is_jpeg_candidate, needs_scoring, select_images
from worker.blob_listing import ListedBlob
from worker.results import META_CODE, META_SOURCE_ETAG, META_STATUS


def test_jpeg_by_extension_in_any_case() -> None:
    assert is_jpeg_candidate("a/b/photo.JPG", None)
    assert is_jpeg_candidate("photo.jpeg", "application/octet-stream")
    assert is_jpeg_candidate("x.JfIf", None)


def test_jpeg_by_content_type_without_extension() -> None:
    assert is_jpeg_candidate("camera/0001", "image/jpeg")
    assert is_jpeg_candidate("camera/0002", "Image/JPEG; charset=binary")


def test_other_files_and_folders_are_not_candidates() -> None:
    assert not is_jpeg_candidate("notes.txt", "text/plain")
    assert not is_jpeg_candidate("photo.png", "image/png")
    assert not is_jpeg_candidate("folder.jpg/", None)


def test_results_are_never_listed_as_images() -> None:
    listing = [
        ListedBlob("a.jpg", '"1"', 10, None),
        ListedBlob("blobscore-results/local/a.jpg.json", '"2"', 10, "application/json"),
        ListedBlob("blobscore-results/local/evil.jpg", '"3"', 10, "image/jpeg"),
        ListedBlob("b.txt", '"4"', 10, "text/plain"),
    ]
    selected = [blob.name for blob in select_images(listing, ("blobscore-results/local/",))]
    assert selected == ["a.jpg"]


def test_current_results_come_from_one_metadata_listing() -> None:
    prefix = "blobscore-results/local/"
    listing = [
        (f"{prefix}a.jpg.json", {META_SOURCE_ETAG: '"e1"', META_STATUS: "ok"}),
        (f"{prefix}b.jpg.json", {META_SOURCE_ETAG: '"e2"', META_STATUS: "rejected", META_CODE: "truncated"}),
        (f"{prefix}c.jpg.json", {META_SOURCE_ETAG: '"e3"', META_STATUS: "rejected", META_CODE: "retries_exhausted"}),
        (f"{prefix}stray.txt", {META_SOURCE_ETAG: '"e4"'}),
        (f"{prefix}foreign.jpg.json", {}),
    ]
    results = current_results(listing, prefix)
    assert set(results) == {"a.jpg", "b.jpg", "c.jpg"}
    assert not needs_scoring(ListedBlob("a.jpg", '"e1"', 1, None), results)
    assert needs_scoring(ListedBlob("a.jpg", '"changed"', 1, None), results)
    assert not needs_scoring(ListedBlob("b.jpg", '"e2"', 1, None), results)
    # A run that gave up on retries says nothing about the image: try it again.
    assert needs_scoring(ListedBlob("c.jpg", '"e3"', 1, None), results)
    assert needs_scoring(ListedBlob("new.jpg", '"e5"', 1, None), results)
