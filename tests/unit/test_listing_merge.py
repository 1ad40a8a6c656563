"""The merge of a page of source names with the results listing: flat memory, and right where `.json` sorts apart."""

from __future__ import annotations

from producer.carrier import pack_cursor, unpack_cursor
from producer.listing import ResultsCursor, ResultsPage, results_for_page

PREFIX = "blobscore-results/local/"


def metadata(etag: str) -> dict[str, str]:
    return {"blobscore_source_etag": etag, "blobscore_status": "ok", "blobscore_job": "j"}


class ResultsListing:
    """The results prefix listed in name order, `size` entries a page; counts the pages read."""

    def __init__(self, sources: list[str], size: int) -> None:
        self.entries = sorted((f"{PREFIX}{name}.json", metadata(f"e-{name}")) for name in sources)
        self.size, self.reads = size, 0

    def read(self, continuation: str | None) -> ResultsPage:
        self.reads += 1
        start = int(continuation or 0)
        end = start + self.size
        return list(self.entries[start:end]), (str(end) if end < len(self.entries) else None)


def merge_all(source_pages: list[list[str]], listing: ResultsListing) -> tuple[dict[str, str], int]:
    cursor, found, most_ahead = ResultsCursor(), {}, 0
    for names in source_pages:
        page, cursor = results_for_page(sorted(names), cursor, PREFIX, listing.read)
        found.update({name: result.source_etag for name, result in page.items()})
        most_ahead = max(most_ahead, len(cursor.ahead))
        cursor = unpack_cursor(pack_cursor(cursor))  # as a step stores it between pages
    return found, most_ahead


def test_every_result_is_found_once_with_memory_bounded_by_a_page() -> None:
    names = [f"img-{number:05d}.jpg" for number in range(2000)]
    with_results = names[::3]
    listing = ResultsListing(with_results, size=100)
    pages = [names[start : start + 100] for start in range(0, len(names), 100)]
    found, most_ahead = merge_all(pages, listing)
    assert found == {name: f"e-{name}" for name in with_results}
    assert most_ahead <= 100  # never more than one results page held
    assert listing.reads == len(listing.entries) // 100 + 1  # each results page read once


def test_names_whose_result_names_sort_differently_are_still_matched() -> None:
    # "a.jpg" < "a.jpg-2.jpg" < "a.jpg.old.jpg" but "a.jpg-2.jpg.json" < "a.jpg.json" < "a.jpg.old.jpg.json".
    names = ["a.jpg", "a.jpg (copy).jpg", "a.jpg-2.jpg", "a.jpg.old.jpg", "b.jpg"]
    listing = ResultsListing(names, size=1)
    found, _ = merge_all([[name] for name in sorted(names)], listing)
    assert set(found) == set(names)


def test_pages_without_results_and_results_without_sources() -> None:
    listing = ResultsListing(["gone-1.jpg", "kept.jpg", "zz-gone.jpg"], size=2)
    found, _ = merge_all([["a.jpg", "b.jpg"], ["kept.jpg", "new.jpg"]], listing)
    assert found == {"kept.jpg": "e-kept.jpg"}
