"""Which listed blobs are images to score, and which already have a current result (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from worker.results import ExistingResult, existing_from_metadata, is_current, source_blob_name
from worker.storage import ListedBlob

JPEG_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif")
JPEG_CONTENT_TYPES = frozenset({"image/jpeg", "image/pjpeg"})
# Results of any service live under this prefix by default: never score them, whatever their name.
DEFAULT_RESULTS_ROOT = "blobscore-results/"


def is_jpeg_candidate(name: str, content_type: str | None) -> bool:
    """A JPEG by extension (any case) or by content type; the worker still checks the bytes themselves."""
    if name.endswith("/"):
        return False
    if name.lower().endswith(JPEG_EXTENSIONS):
        return True
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return media_type in JPEG_CONTENT_TYPES


def is_excluded(name: str, excluded_prefixes: Iterable[str]) -> bool:
    """True for blobs under a results prefix."""
    return any(prefix and name.startswith(prefix) for prefix in excluded_prefixes)


def select_images(listing: Iterable[ListedBlob], excluded_prefixes: tuple[str, ...]) -> Iterator[ListedBlob]:
    """The blobs of a listing worth queueing."""
    for blob in listing:
        if not is_excluded(blob.name, excluded_prefixes) and is_jpeg_candidate(blob.name, blob.content_type):
            yield blob


def current_results(
    results_listing: Iterable[tuple[str, Mapping[str, str]]], results_prefix: str
) -> dict[str, ExistingResult]:
    """Source blob name -> what its stored result says, from one listing of the results prefix."""
    found: dict[str, ExistingResult] = {}
    for name, metadata in results_listing:
        source = source_blob_name(results_prefix, name)
        existing = existing_from_metadata(dict(metadata))
        if source is not None and existing is not None:
            found[source] = existing
    return found


def needs_scoring(blob: ListedBlob, results: Mapping[str, ExistingResult]) -> bool:
    """True unless a result for this exact blob version is already stored."""
    return not is_current(results.get(blob.name), blob.etag)
