"""Which listed blobs are images to score, and which already have a current result (pure)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from worker.blob_listing import ListedBlob
from worker.results import ExistingResult, existing_from_metadata, is_current, result_blob_name, source_blob_name

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


@dataclass(frozen=True)
class ResultsCursor:
    """Where the merge with the results listing stands: its continuation, and results read ahead of the sources.

    Sources and results are both listed in name order, but `name.json` does not always sort like `name` ("a.jpg"
    < "a.jpg-2.jpg" while "a.jpg-2.jpg.json" < "a.jpg.json"): results are read up to the largest result name a
    page of sources could have, and what was read beyond the page is kept here for the next pages. That is at
    most one page of results, whatever the size of the container.
    """

    continuation: str | None = None
    ahead: Mapping[str, ExistingResult] = field(default_factory=dict)
    exhausted: bool = False
    # The last result name read: the listing is read further only for a page that may need more.
    last_read: str | None = None


ResultsPage = tuple[list[tuple[str, dict[str, str]]], str | None]


def results_for_page(
    names: list[str], cursor: ResultsCursor, results_prefix: str, read_page: Callable[[str | None], ResultsPage]
) -> tuple[dict[str, ExistingResult], ResultsCursor]:
    """The stored results of one page of source names (sorted), reading the results listing only as far as needed."""
    if not names:
        return {}, cursor
    bound = max(result_blob_name(results_prefix, name) for name in names)
    ahead, continuation, exhausted = dict(cursor.ahead), cursor.continuation, cursor.exhausted
    last_read = cursor.last_read
    while not exhausted and (last_read is None or last_read < bound):
        entries, continuation = read_page(continuation)
        for name, metadata in entries:
            last_read = name
            source, existing = source_blob_name(results_prefix, name), existing_from_metadata(dict(metadata))
            if source is not None and existing is not None:
                ahead[source] = existing
        exhausted = continuation is None
    found = {name: ahead[name] for name in names if name in ahead}
    # Sources come in name order: results of names up to this page's last one are never asked for again.
    last = names[-1]
    return found, ResultsCursor(continuation, {name: result for name, result in ahead.items() if name > last},
                                exhausted, last_read)
