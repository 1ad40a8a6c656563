"""Build SSD-VGG replay tensors from known boxes: the exact inverse of worker.models.ssd's decoding.

Each box is written at its best-matching free anchor (highest IoU) with offsets that decode back to
the box and logits that give its class the requested softmax score; every other anchor is strongly
background. The stand-in serves such a file with ``--replay``, so tests know which boxes must come back.

    python -m deploy.standin.ssd_replay OUT.npz --box "class_id,score,y1,x1,y2,x2" [--box ...]

The ``.npz`` is keyed by the catalog's tensor names: ``np.savez`` stores a key with '/' and ':' as a
zip member path and ``np.load`` lists it back under the same name, so no key mapping is needed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.models.catalog import SSD_ANCHORS_PER_CELL, SSD_GRID_SIZES, SSD_NUM_CLASSES
from worker.models.ssd import (
    ANCHOR_COUNT,
    BOX_COORDINATES,
    DEFAULT_LOGITS_NAMES,
    DEFAULT_OFFSETS_NAMES,
    LAYER_ANCHOR_COUNTS,
    PRIOR_SCALING,
    anchors,
    iou,
    to_corners,
)

FloatArray = npt.NDArray[np.float64]
# Background's logit where every class logit is 0: each class then scores about 2e-9.
BACKGROUND_LOGIT = 20.0
_BOX_FIELDS = 6


@dataclass(frozen=True)
class KnownBox:
    """A box the replayed tensors must decode to: class id 1-20, score in (0, 1), (y1, x1, y2, x2) fractions."""

    class_id: int
    score: float
    box: tuple[float, float, float, float]

    def __post_init__(self) -> None:
        if not 1 <= self.class_id < SSD_NUM_CLASSES:
            raise ValueError(f"class_id must be 1..{SSD_NUM_CLASSES - 1} (0 is background), got {self.class_id}")
        if not 0.0 < self.score < 1.0:
            raise ValueError(f"score must be strictly between 0 and 1 (a softmax), got {self.score}")
        y1, x1, y2, x2 = self.box
        # The decoder clips to the image, so a box outside [0, 1] could not come back unchanged.
        if not (0.0 <= y1 < y2 <= 1.0 and 0.0 <= x1 < x2 <= 1.0):
            raise ValueError(f"box must be (y1, x1, y2, x2) within [0, 1] with y1 < y2 and x1 < x2, got {self.box}")

    @classmethod
    def parse(cls, text: str) -> KnownBox:
        """A box from "class_id,score,y1,x1,y2,x2"."""
        fields = [field.strip() for field in text.split(",")]
        if len(fields) != _BOX_FIELDS:
            raise ValueError(f"expected class_id,score,y1,x1,y2,x2, got {text!r}")
        y1, x1, y2, x2 = (float(field) for field in fields[2:])
        return cls(int(fields[0]), float(fields[1]), (y1, x1, y2, x2))


def encode_offsets(box: tuple[float, float, float, float], anchor: FloatArray) -> FloatArray:
    """The (x, y, w, h) offsets that decode to `box` (y1, x1, y2, x2) from a (cy, cx, h, w) anchor."""
    y1, x1, y2, x2 = box
    cy, cx, h, w = (y1 + y2) / 2, (x1 + x2) / 2, y2 - y1, x2 - x1
    anchor_cy, anchor_cx, anchor_h, anchor_w = (float(value) for value in anchor)
    unscaled = (
        (cx - anchor_cx) / anchor_w,
        (cy - anchor_cy) / anchor_h,
        math.log(w / anchor_w),
        math.log(h / anchor_h),
    )
    offsets: FloatArray = np.array(unscaled) / np.array(PRIOR_SCALING)
    return offsets


def class_logits(class_id: int, score: float) -> FloatArray:
    """21 logits whose softmax gives `class_id` exactly `score`, the other 20 classes sharing the rest."""
    logits = np.zeros(SSD_NUM_CLASSES, dtype=np.float64)
    # e^z / (e^z + 20) = score  <=>  z = log(20 · score / (1 - score))
    logits[class_id] = math.log((SSD_NUM_CLASSES - 1) * score / (1.0 - score))
    return logits


def best_free_anchor(box: tuple[float, float, float, float], taken: npt.NDArray[np.bool_]) -> int:
    """The not yet `taken` anchor with the highest IoU with `box` (first in tensor order on ties)."""
    overlaps = iou(np.array(box, dtype=np.float64), to_corners(anchors()))
    overlaps[taken] = -1.0
    return int(np.argmax(overlaps))


def _split_by_layer(flat: FloatArray, names: Sequence[str]) -> dict[str, npt.NDArray[np.float32]]:
    """[8432, depth] rows back into the six [1, grid, grid, anchors, depth] float32 tensors, by name."""
    depth = flat.shape[1]
    bounds = np.cumsum(LAYER_ANCHOR_COUNTS)[:-1]
    layers = zip(names, np.split(flat, bounds), SSD_GRID_SIZES, SSD_ANCHORS_PER_CELL, strict=True)
    return {
        name: rows.reshape(1, grid, grid, per_cell, depth).astype(np.float32)
        for name, rows, grid, per_cell in layers
    }


def build_replay(boxes: Sequence[KnownBox]) -> dict[str, npt.NDArray[np.float32]]:
    """The 12 SSD-VGG output tensors (float32, batch 1, keyed by the catalog's names) that decode to `boxes`."""
    if len(boxes) > ANCHOR_COUNT:
        raise ValueError(f"at most {ANCHOR_COUNT} boxes fit, one per anchor; got {len(boxes)}")
    logits = np.zeros((ANCHOR_COUNT, SSD_NUM_CLASSES), dtype=np.float64)
    logits[:, 0] = BACKGROUND_LOGIT
    offsets = np.zeros((ANCHOR_COUNT, BOX_COORDINATES), dtype=np.float64)
    taken = np.zeros(ANCHOR_COUNT, dtype=bool)
    for known in boxes:
        # Two boxes may share a best anchor; the second takes its next best, which decodes just as exactly.
        anchor_id = best_free_anchor(known.box, taken)
        taken[anchor_id] = True
        offsets[anchor_id] = encode_offsets(known.box, anchors()[anchor_id])
        logits[anchor_id] = class_logits(known.class_id, known.score)
    return _split_by_layer(logits, DEFAULT_LOGITS_NAMES) | _split_by_layer(offsets, DEFAULT_OFFSETS_NAMES)


def write_replay(path: Path, boxes: Sequence[KnownBox]) -> None:
    """Write the replay tensors of `boxes` to `path` as an .npz keyed by tensor names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Through a file object: np.savez given a path would append ".npz" to any other suffix.
    with path.open("wb") as file:
        # Typed as Any: the stubs fear a tensor named "allow_pickle" would land on that keyword.
        tensors: dict[str, Any] = dict(build_replay(boxes))
        np.savez(file, **tensors)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write OUT.npz holding the SSD-VGG tensors of the given boxes."""
    parser = argparse.ArgumentParser(prog="python -m deploy.standin.ssd_replay", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the .npz file to write")
    parser.add_argument(
        "--box", action="append", default=[], metavar="CLASS_ID,SCORE,Y1,X1,Y2,X2",
        help="a box to replay, as fractions of the image (repeatable; none gives an all-background file)",
    )
    args = parser.parse_args(argv)
    try:
        boxes = [KnownBox.parse(text) for text in args.box]
    except ValueError as exc:
        parser.error(str(exc))
    write_replay(args.out, boxes)
    print(f"wrote {len(boxes)} box(es) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
