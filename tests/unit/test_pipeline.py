"""One image's path in process, with small in-memory fakes of the Blob, job and scoring adapters.

The integration and fault suites run the same code against Azurite, Redis and the stand-in; these pin the
decisions (write once, keep the winner, give up through the same write path) without any service.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from worker.contracts import ImageTask, ResultDoc
from worker.errors import PermanentError, RejectionCode
from worker.models.catalog import get_profile
from worker.models.postprocess import PostprocessOptions
from worker.pipeline import Dependencies, Limits, give_up, process_image
from worker.results import ExistingResult, existing_from_metadata, result_location, result_metadata
from worker.retry import GiveUp
from worker.storage import Downloaded, ResultConflictError

PROFILE = get_profile("resnet50")
LIMITS = Limits(16 * 1024 * 1024, 80_000_000, PostprocessOptions(top_k=3, detection_threshold=0.5))
_etags = itertools.count(1)


def jpeg(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


@dataclass
class FakeStore:
    """Blob Storage in a dict: create-only writes and exact-etag replacement, like the real adapter."""

    sources: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    results: dict[str, tuple[bytes, dict[str, str], str]] = field(default_factory=dict)
    writes: int = 0
    sneak_in: ResultDoc | None = None  # a result another delivery writes just before ours

    def download(self, container: str, blob: str, max_bytes: int) -> Downloaded:
        if blob not in self.sources:
            raise PermanentError(RejectionCode.SOURCE_MISSING, "the source blob no longer exists")
        data, etag = self.sources[blob]
        return Downloaded(data[: max_bytes + 1], etag, len(data))

    def source_etag(self, container: str, blob: str) -> str | None:
        return self.sources[blob][1] if blob in self.sources else None

    def existing_result(self, container: str, name: str) -> tuple[ExistingResult | None, str | None]:
        if name not in self.results:
            return None, None
        _, metadata, etag = self.results[name]
        return existing_from_metadata(metadata), etag

    def write_result(
        self, container: str, name: str, body: bytes, metadata: dict[str, str], replaces_etag: str | None
    ) -> None:
        if self.sneak_in is not None:
            doc, self.sneak_in = self.sneak_in, None
            self._put(name, doc.to_json(), result_metadata(doc))
        current = self.results.get(name)
        if (replaces_etag is None and current is not None) or (
            replaces_etag is not None and (current is None or current[2] != replaces_etag)
        ):
            raise ResultConflictError(f"{name} was written meanwhile")
        self._put(name, body, metadata)

    def _put(self, name: str, body: bytes, metadata: dict[str, str]) -> None:
        self.writes += 1
        self.results[name] = (body, metadata, f"r{next(_etags)}")


@dataclass
class FakeJobs:
    outcomes: dict[int, str] = field(default_factory=dict)

    def record_outcome(self, job_id: str, index: int, blob: str, outcome: str) -> None:
        self.outcomes.setdefault(index, outcome)  # counted once, however often recorded


@dataclass
class FakeScorer:
    calls: int = 0
    fail: Exception | None = None

    def predict(self, image: bytes) -> dict[str, npt.NDArray[np.float32]]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        scores = np.zeros((1, 1000), dtype=np.float32)
        scores[0, 281] = 0.9
        return {PROFILE.outputs[0]: scores}


def task(blob: str = "cat.jpg", etag: str = "e1") -> ImageTask:
    return ImageTask(namespace="ns", account="acct", endpoint="acct.blob.core.windows.net", job_id="j", index=0,
                     container="c", blob=blob, etag=etag, size=1, service="local", results_container="c",
                     results_prefix="blobscore-results/local/")


def deps(store: FakeStore, jobs: FakeJobs, scorer: FakeScorer) -> Dependencies:
    return Dependencies(store, jobs, scorer, PROFILE, LIMITS)  # type: ignore[arg-type]


def stored(store: FakeStore, blob: str = "cat.jpg") -> ResultDoc:
    name, _ = result_location("blobscore-results/local/", blob)
    return ResultDoc.from_json(store.results[name][0])


def test_an_image_is_scored_and_written_once() -> None:
    store, jobs, scorer = FakeStore(sources={"cat.jpg": (jpeg(), "e1")}), FakeJobs(), FakeScorer()
    outcome = process_image(task(), deps(store, jobs, scorer), check_first=False)
    assert (outcome.status, outcome.written, scorer.calls, store.writes) == ("ok", True, 1, 1)
    assert stored(store).labels is not None
    assert stored(store).labels[0].class_id == 281  # type: ignore[index]
    assert jobs.outcomes == {0: "ok"}
    # Delivered again (a retry): the current result is found before anything is downloaded or scored.
    again = process_image(task(), deps(store, jobs, scorer), check_first=True)
    assert (again.status, again.written, scorer.calls, store.writes) == ("ok", False, 1, 1)


def test_a_bad_image_is_rejected_without_reaching_the_scorer() -> None:
    store, jobs, scorer = FakeStore(sources={"cat.jpg": (b"not a jpeg", "e1")}), FakeJobs(), FakeScorer()
    outcome = process_image(task(), deps(store, jobs, scorer), check_first=False)
    assert (outcome.status, scorer.calls) == ("rejected", 0)
    assert stored(store).error is not None
    assert stored(store).error.code == RejectionCode.NOT_AN_IMAGE  # type: ignore[union-attr]


def test_a_write_that_lost_the_race_keeps_the_winner() -> None:
    store, jobs, scorer = FakeStore(sources={"cat.jpg": (jpeg(), "e1")}), FakeJobs(), FakeScorer()
    store.sneak_in = ResultDoc.from_json(_ok_doc_bytes(store))  # another delivery writes first
    outcome = process_image(task(), deps(store, jobs, scorer), check_first=False)
    assert (outcome.status, outcome.written) == ("ok", False)
    assert store.writes == 1  # only the winner's write
    assert jobs.outcomes == {0: "ok"}


def _ok_doc_bytes(store: FakeStore) -> bytes:
    other = FakeStore(sources=dict(store.sources))
    process_image(task(), deps(other, FakeJobs(), FakeScorer()), check_first=False)
    return other.results[result_location("blobscore-results/local/", "cat.jpg")[0]][0]


def test_giving_up_goes_through_the_same_write_path_and_keeps_a_result_of_this_version() -> None:
    store, jobs = FakeStore(sources={"cat.jpg": (jpeg(), "e1")}), FakeJobs()
    outcome = give_up(task(), store, jobs, "resnet50", GiveUp(RejectionCode.RETRIES_EXHAUSTED, "gave up"))  # type: ignore[arg-type]
    assert (outcome.status, outcome.written) == ("rejected", True)
    assert stored(store).error is not None
    assert stored(store).error.code == RejectionCode.RETRIES_EXHAUSTED  # type: ignore[union-attr]
    # A second give-up of the same version keeps the record (and counts it) instead of writing again.
    again = give_up(task(), store, FakeJobs(), "resnet50", GiveUp(RejectionCode.TOO_MANY_ATTEMPTS, "x"))  # type: ignore[arg-type]
    assert (again.status, again.written, store.writes) == ("rejected", False, 1)


def test_a_scorer_outage_propagates_for_the_retry_policy_and_writes_nothing() -> None:
    from worker.scoring import ScoringUnavailableError

    store, jobs = FakeStore(sources={"cat.jpg": (jpeg(), "e1")}), FakeJobs()
    scorer = FakeScorer(fail=ScoringUnavailableError("scoring service UNAVAILABLE: down"))
    with pytest.raises(ScoringUnavailableError):
        process_image(task(), deps(store, jobs, scorer), check_first=False)
    assert (store.writes, jobs.outcomes) == (0, {})
