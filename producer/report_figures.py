"""What a job's results add up to (pure): the images that get a card, and the figures above them.

The figures: duration and rate, score latency percentiles, the top-1 score histogram, the most frequent top-1
labels and the rejections by code. producer/report.py turns them into HTML.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from worker.contracts import DetectionDoc, ResultDoc

# Large jobs: the first images by name, plus a deterministic sample of the rest.
FIRST_IMAGES = 500
SAMPLED_IMAGES = 500
FREQUENT_LABELS = 10
HISTOGRAM_BINS = 10
# Below this span, millisecond timestamps say little about a rate: it is shown as "—".
MIN_RATE_SPAN_S = 1.0


@dataclass(frozen=True)
class Selection:
    """The scored images that get a card: the first ones by name, then a deterministic sample of the rest."""

    shown: list[ResultDoc]
    total: int
    first: int
    sampled: int


@dataclass(frozen=True)
class Summary:
    """The job's figures above the cards."""

    duration_s: float | None
    images_per_s: float | None
    latency_ms: dict[str, float]
    histogram: list[int]
    frequent: list[tuple[str, int]]
    codes: list[tuple[str, int]]


def _sample_key(doc: ResultDoc) -> str:
    """The order the sample is drawn in."""
    # A hash of the name: the same job always shows the same sample, spread evenly over the names.
    return hashlib.sha256(doc.source.blob.encode("utf-8")).hexdigest()


def select_images(docs: Iterable[ResultDoc], first: int = FIRST_IMAGES, sample: int = SAMPLED_IMAGES) -> Selection:
    """The scored (ok) images to show as cards, in name order."""
    ok = sorted((doc for doc in docs if doc.status == "ok"), key=lambda doc: doc.source.blob)
    head, rest = ok[:first], ok[first:]
    sampled = sorted(sorted(rest, key=_sample_key)[:sample], key=lambda doc: doc.source.blob)
    return Selection(shown=head + sampled, total=len(ok), first=len(head), sampled=len(sampled))


def _parse_time(value: str) -> float | None:
    """Seconds since the epoch of an RFC 3339 time (None when it does not parse)."""
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of non-empty `values` (`fraction` in 0..1)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def ranked(doc: ResultDoc, limit: int) -> list[tuple[str, float]]:
    """A scored image's best (label, score) pairs, at most `limit`: its labels in their order, else its best
    detections."""
    if doc.labels:
        return [(label.label, label.score) for label in doc.labels[:limit]]
    return [(detection.label, detection.score) for detection in best_detections(doc, limit)]


def best_detections(doc: ResultDoc, limit: int) -> list[DetectionDoc]:
    """A scored image's detections, best score first, at most `limit`."""
    return sorted(doc.detections or [], key=lambda detection: -detection.score)[:limit]


def top1(doc: ResultDoc) -> tuple[str, float] | None:
    """The best label of a scored image: its first label, else its best detection."""
    best = ranked(doc, 1)
    return best[0] if best else None


def histogram(scores: Iterable[float], bins: int = HISTOGRAM_BINS) -> list[int]:
    """Counts of scores in `bins` equal bins over 0..1 (1.0 falls in the last bin)."""
    counts = [0] * bins
    for score in scores:
        counts[min(bins - 1, max(0, int(score * bins)))] += 1
    return counts


def summarize(docs: Sequence[ResultDoc]) -> Summary:
    """Duration and rate from the `scored_at` range, score latency percentiles, top-1 histogram and labels."""
    times = sorted(t for t in (_parse_time(doc.scored_at) for doc in docs) if t is not None)
    duration = times[-1] - times[0] if len(times) >= 2 else None
    # n results span n-1 gaps between the first and the last.
    rate = (len(times) - 1) / duration if duration is not None and duration >= MIN_RATE_SPAN_S else None
    latencies = [doc.timings_ms["score"] for doc in docs if "score" in doc.timings_ms]
    latency = {name: percentile(latencies, q) for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))} \
        if latencies else {}
    tops = [best for best in (top1(doc) for doc in docs if doc.status == "ok") if best is not None]
    codes = Counter(doc.error.code for doc in docs if doc.status == "rejected" and doc.error is not None)
    return Summary(
        duration_s=duration, images_per_s=rate, latency_ms=latency,
        histogram=histogram(score for _, score in tops),
        frequent=Counter(label for label, _ in tops).most_common(FREQUENT_LABELS),
        codes=codes.most_common(),
    )
