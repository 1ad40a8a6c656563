"""Turn a classifier's output vector (softmax or logits) into ranked, named labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from worker.errors import PermanentError, RejectionCode


@dataclass(frozen=True)
class Label:
    """One ranked class of a classification result."""

    class_id: int
    label: str
    score: float


def stable_softmax(logits: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """Softmax that cannot overflow: shift by the maximum before exponentiating."""
    shifted = logits.astype(np.float64) - np.max(logits)
    exp = np.exp(shifted)
    result: npt.NDArray[np.float64] = exp / exp.sum()
    return result


def top_k(
    scores: npt.NDArray[np.floating], names: tuple[str, ...], k: int, *, are_logits: bool = False
) -> list[Label]:
    """The `k` best classes of one image's score vector, best first."""
    vector = np.asarray(scores).reshape(-1)
    if vector.size != len(names):
        raise PermanentError(
            RejectionCode.BAD_MODEL_OUTPUT, f"model returned {vector.size} scores for {len(names)} classes"
        )
    if not np.all(np.isfinite(vector)):
        raise PermanentError(RejectionCode.BAD_MODEL_OUTPUT, "model returned non-finite scores")
    probabilities = stable_softmax(vector) if are_logits else vector.astype(np.float64)
    k = min(k, vector.size)
    best = np.argpartition(-probabilities, k - 1)[:k]
    ranked = best[np.argsort(-probabilities[best], kind="stable")]
    return [Label(int(i), names[int(i)], round(float(probabilities[i]), 6)) for i in ranked]
