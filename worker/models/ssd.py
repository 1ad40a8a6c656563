"""Decode SSD-300 VGG output tensors into labeled, non-overlapping boxes (pure numpy).

The anchors, offset encoding and post-processing are those the Azure ML ``ssd_vgg`` model was trained
with: a 300×300 input (resized without keeping the aspect ratio), one anchor layer per feature map,
offsets ordered (x, y, w, h) with prior scaling (0.1, 0.1, 0.2, 0.2), softmax over 21 Pascal VOC
classes (0 = background), a score threshold, the top-k candidates, then greedy NMS per class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.errors import PermanentError, RejectionCode
from worker.models.catalog import (
    SSD_ANCHORS_PER_CELL,
    SSD_GRID_SIZES,
    SSD_LAYERS,
    SSD_NUM_CLASSES,
    ssd_logits_name,
    ssd_offsets_name,
)
from worker.models.labels import PASCAL_VOC_21

FloatArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.intp]

IMAGE_SIZE = 300
STEPS: tuple[int, ...] = (8, 16, 32, 64, 100, 300)
ANCHOR_OFFSET = 0.5
# (s0, s1) per layer, in pixels of the 300×300 input.
ANCHOR_SIZES: tuple[tuple[int, int], ...] = ((21, 45), (45, 99), (99, 153), (153, 207), (207, 261), (261, 315))
ASPECT_RATIOS: tuple[tuple[float, ...], ...] = (
    (2.0, 0.5),
    (2.0, 0.5, 3.0, 1.0 / 3.0),
    (2.0, 0.5, 3.0, 1.0 / 3.0),
    (2.0, 0.5, 3.0, 1.0 / 3.0),
    (2.0, 0.5),
    (2.0, 0.5),
)
# Offsets are (x, y, w, h), each divided by its prior scaling at training time.
PRIOR_SCALING: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
BOX_COORDINATES = 4

LAYER_ANCHOR_COUNTS: tuple[int, ...] = tuple(
    grid * grid * per_cell for grid, per_cell in zip(SSD_GRID_SIZES, SSD_ANCHORS_PER_CELL, strict=True)
)
# 37·37·4 + 19·19·6 + 10·10·6 + 5·5·6 + 3·3·4 + 1·1·4 (the usual 8732 is for a 38×38 first layer).
ANCHOR_COUNT = sum(LAYER_ANCHOR_COUNTS)

DEFAULT_LOGITS_NAMES: tuple[str, ...] = tuple(ssd_logits_name(layer) for layer in SSD_LAYERS)
DEFAULT_OFFSETS_NAMES: tuple[str, ...] = tuple(ssd_offsets_name(layer) for layer in SSD_LAYERS)

DEFAULT_SCORE_THRESHOLD = 0.5
DEFAULT_TOP_K = 400
DEFAULT_IOU_THRESHOLD = 0.45


@dataclass(frozen=True)
class Detection:
    """One detected object.

    `box` is (y1, x1, y2, x2) as fractions of the image, rounded to 6 decimals; `box_px` is the same box
    in pixels of the original image (y1·height, x1·width, y2·height, x2·width), rounded to 1 decimal.
    """

    class_id: int
    label: str
    score: float
    box: tuple[float, float, float, float]
    box_px: tuple[float, float, float, float]


def _layer_anchors(grid: int, step: int, sizes: tuple[int, int], ratios: tuple[float, ...]) -> FloatArray:
    """The (cy, cx, h, w) anchors of one layer, ordered row, column, anchor like the output tensors."""
    small, large = sizes
    shapes = [(small, small), (math.sqrt(small * large),) * 2]
    shapes += [(small / math.sqrt(ratio), small * math.sqrt(ratio)) for ratio in ratios]
    hw = np.array(shapes, dtype=np.float64) / IMAGE_SIZE
    centres = (np.arange(grid, dtype=np.float64) + ANCHOR_OFFSET) * step / IMAGE_SIZE
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    per_cell = len(shapes)
    layer = np.empty((grid, grid, per_cell, BOX_COORDINATES), dtype=np.float64)
    layer[..., 0] = cy[:, :, None]
    layer[..., 1] = cx[:, :, None]
    layer[..., 2:] = hw
    return layer.reshape(-1, BOX_COORDINATES)


@cache
def anchors() -> FloatArray:
    """All 8432 anchors as (cy, cx, h, w) fractions, in output-tensor order; computed once, read-only."""
    layers = zip(SSD_GRID_SIZES, STEPS, ANCHOR_SIZES, ASPECT_RATIOS, strict=True)
    result = np.concatenate([_layer_anchors(*layer) for layer in layers])
    result.flags.writeable = False
    return result


def to_corners(centre_boxes: FloatArray) -> FloatArray:
    """(cy, cx, h, w) boxes to (y1, x1, y2, x2)."""
    centre, half = centre_boxes[:, :2], centre_boxes[:, 2:] / 2
    return np.concatenate([centre - half, centre + half], axis=1)


_MAX_LOG_GROWTH = 700.0


def decode_boxes(anchor_boxes: FloatArray, offsets: npt.NDArray[Any]) -> FloatArray:
    """(y1, x1, y2, x2) boxes from (cy, cx, h, w) anchors and their (x, y, w, h) offsets."""
    scaled = offsets.astype(np.float64) * np.array(PRIOR_SCALING)
    # exp overflows float64 past ~709; a box grown e^700-fold covers the whole image either way.
    scaled[:, 2:] = np.minimum(scaled[:, 2:], _MAX_LOG_GROWTH)
    cy = scaled[:, 1] * anchor_boxes[:, 2] + anchor_boxes[:, 0]
    cx = scaled[:, 0] * anchor_boxes[:, 3] + anchor_boxes[:, 1]
    h = anchor_boxes[:, 2] * np.exp(scaled[:, 3])
    w = anchor_boxes[:, 3] * np.exp(scaled[:, 2])
    return to_corners(np.stack([cy, cx, h, w], axis=1))


def pairwise_iou(first: FloatArray, second: FloatArray) -> FloatArray:
    """[n, m] intersection over union of (y1, x1, y2, x2) boxes; 0 where both boxes are empty."""
    y1, x1, y2, x2 = (first[:, None, k] for k in range(BOX_COORDINATES))
    other_y1, other_x1, other_y2, other_x2 = (second[None, :, k] for k in range(BOX_COORDINATES))
    heights = np.clip(np.minimum(y2, other_y2) - np.maximum(y1, other_y1), 0.0, None)
    widths = np.clip(np.minimum(x2, other_x2) - np.maximum(x1, other_x1), 0.0, None)
    intersection = heights * widths
    union = (y2 - y1) * (x2 - x1) + (other_y2 - other_y1) * (other_x2 - other_x1) - intersection
    result: FloatArray = intersection / np.maximum(union, np.finfo(np.float64).tiny)
    return result


def iou(box: FloatArray, boxes: FloatArray) -> FloatArray:
    """Intersection over union of one (y1, x1, y2, x2) box with each of `boxes`."""
    overlaps: FloatArray = pairwise_iou(box.reshape(1, BOX_COORDINATES), boxes)[0]
    return overlaps


# Rows of IoU computed at once in `nms`: bounds its float temporaries to a few MB whatever the box count.
_IOU_ROWS_PER_BLOCK = 256


def nms(boxes: FloatArray, scores: FloatArray, iou_threshold: float) -> IndexArray:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first.

    A box is dropped when its IoU with an already kept, higher-scoring box exceeds `iou_threshold`.
    """
    order = np.argsort(-scores, kind="stable")
    ranked = boxes[order]
    suppresses = np.concatenate(
        [
            pairwise_iou(ranked[start : start + _IOU_ROWS_PER_BLOCK], ranked) > iou_threshold
            for start in range(0, len(ranked), _IOU_ROWS_PER_BLOCK)
        ]
        or [np.zeros((0, 0), dtype=bool)]
    )
    suppressed = np.zeros(len(order), dtype=bool)
    kept: list[int] = []
    # Greedy is sequential, but each step is a single vectorised row update.
    for rank in range(len(order)):
        if not suppressed[rank]:
            kept.append(rank)
            suppressed |= suppresses[rank]
    result: IndexArray = order[kept]
    return result


def nms_per_class(boxes: FloatArray, scores: FloatArray, class_ids: IndexArray, iou_threshold: float) -> IndexArray:
    """`nms` within each class (boxes of different classes never suppress each other), best score first."""
    kept = [
        members[nms(boxes[members], scores[members], iou_threshold)]
        for members in (np.flatnonzero(class_ids == class_id) for class_id in np.unique(class_ids))
    ]
    if not kept:
        return np.empty(0, dtype=np.intp)
    merged = np.concatenate(kept)
    ranked: IndexArray = merged[np.argsort(-scores[merged], kind="stable")]
    return ranked


def _gather_layers(
    outputs: Mapping[str, npt.NDArray[Any]], names: Sequence[str], depth: int
) -> list[npt.NDArray[Any]]:
    """The six per-layer tensors as [anchors, depth] views, after checking names and shapes (batch 1 or none)."""
    if len(names) != len(SSD_LAYERS):
        raise ValueError(f"SSD-VGG has {len(SSD_LAYERS)} layers, got {len(names)} tensor names")
    rows = []
    for name, grid, per_cell in zip(names, SSD_GRID_SIZES, SSD_ANCHORS_PER_CELL, strict=True):
        if name not in outputs:
            raise PermanentError(RejectionCode.BAD_MODEL_OUTPUT, f"the service returned no tensor {name!r}")
        tensor = np.asarray(outputs[name])
        expected = (grid, grid, per_cell, depth)
        if tensor.shape not in (expected, (1, *expected)):
            raise PermanentError(
                RejectionCode.BAD_MODEL_OUTPUT,
                f"tensor {name!r} has shape {list(tensor.shape)}, expected {[1, *expected]}",
            )
        rows.append(tensor.reshape(-1, depth))
    return rows


def _class_major(layers: list[npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
    """[anchors, depth] layers as one C-contiguous [depth, 8432] float32 array.

    Reductions over the 21 classes run an order of magnitude faster along the long axis than the short one.
    """
    result = np.empty((layers[0].shape[1], ANCHOR_COUNT), dtype=np.float32)
    start = 0
    for rows in layers:
        result[:, start : start + len(rows)] = rows.T
        start += len(rows)
    return result


def _require_finite(array: npt.NDArray[Any]) -> None:
    if not np.isfinite(array).all():
        raise PermanentError(RejectionCode.BAD_MODEL_OUTPUT, "the service returned non-finite SSD outputs")


def _object_scores(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Softmax over the 21 classes of [21, anchors] logits, without the background row: [20, anchors]."""
    exp = np.exp(logits - logits.max(axis=0))
    exp /= exp.sum(axis=0)
    objects: npt.NDArray[np.float32] = exp[1:]
    return objects


def _best_candidates(
    scores: npt.NDArray[np.float32], threshold: float, top_k: int
) -> tuple[IndexArray, IndexArray, FloatArray]:
    """(anchor, class id, score) of the at most `top_k` best pairs scoring above `threshold`, unordered."""
    flat = np.flatnonzero(scores > threshold)
    if flat.size > top_k:
        flat = flat[np.argpartition(-scores.ravel()[flat], top_k - 1)[:top_k]]
    object_rows, anchor_ids = np.divmod(flat, scores.shape[1])
    # Background is row 0 of the logits, so object row r is class id r + 1.
    return anchor_ids, object_rows + 1, scores.ravel()[flat].astype(np.float64)


def _detections(
    class_ids: IndexArray, scores: FloatArray, boxes: FloatArray, width: int, height: int
) -> list[Detection]:
    """Detection records, rounded as documented on Detection (vectorised: up to top_k of them per image)."""
    pixel_scale = np.array([height, width, height, width], dtype=np.float64)
    rows = zip(
        class_ids.tolist(),
        np.round(scores, 6).tolist(),
        np.round(boxes, 6).tolist(),
        np.round(boxes * pixel_scale, 1).tolist(),
        strict=True,
    )
    return [
        Detection(class_id, PASCAL_VOC_21[class_id], score, tuple(box), tuple(box_px))
        for class_id, score, box, box_px in rows
    ]


def decode_detections(
    outputs: Mapping[str, npt.NDArray[Any]],
    image_width: int,
    image_height: int,
    *,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    top_k: int = DEFAULT_TOP_K,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    logits_names: Sequence[str] | None = None,
    offsets_names: Sequence[str] | None = None,
) -> list[Detection]:
    """The detections of one image from its 12 SSD-VGG tensors, best score first.

    `outputs` maps tensor names to arrays (batch dimension 1, or none); the names default to the
    catalog's and may be overridden, in SSD_LAYERS order. `image_width`/`image_height` are the original
    image's, for `box_px`. A missing tensor, a wrong shape or a non-finite value is a PermanentError
    with BAD_MODEL_OUTPUT.
    """
    if image_width <= 0 or image_height <= 0:
        raise ValueError(f"image size must be positive, got {image_width}x{image_height}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    logits = _class_major(_gather_layers(outputs, logits_names or DEFAULT_LOGITS_NAMES, SSD_NUM_CLASSES))
    offsets = np.concatenate(_gather_layers(outputs, offsets_names or DEFAULT_OFFSETS_NAMES, BOX_COORDINATES))
    _require_finite(logits)
    _require_finite(offsets)
    anchor_ids, class_ids, scores = _best_candidates(_object_scores(logits), score_threshold, top_k)
    # Clipping keeps scores, so clipping only the top-k candidates is the same as clipping all of them first.
    boxes = np.clip(decode_boxes(anchors()[anchor_ids], offsets[anchor_ids]), 0.0, 1.0)
    kept = nms_per_class(boxes, scores, class_ids, iou_threshold)
    return _detections(class_ids[kept], scores[kept], boxes[kept], image_width, image_height)
