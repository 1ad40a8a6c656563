"""From a profile's output tensors to one image's prediction: ranked labels, or detected boxes (pure)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from worker.errors import PermanentError, RejectionCode
from worker.models.catalog import ModelProfile, OutputKind
from worker.models.classification import Label, top_k
from worker.models.labels import class_names
from worker.models.ssd import Detection, decode_detections


@dataclass(frozen=True)
class Prediction:
    """What the model says about one image: labels for a classifier, detections for a detector."""

    labels: list[Label] | None = None
    detections: list[Detection] | None = None


@dataclass(frozen=True)
class PostprocessOptions:
    """Tunables of postprocessing."""

    top_k: int = 5
    detection_threshold: float = 0.5


def postprocess(
    profile: ModelProfile,
    outputs: dict[str, npt.NDArray[np.float32]],
    image_size: tuple[int, int],
    options: PostprocessOptions,
) -> Prediction:
    """Labels or detections for one image of `image_size` (width, height) from the profile's output tensors."""
    if profile.kind is OutputKind.SSD:
        half = len(profile.outputs) // 2
        detections = decode_detections(
            outputs, image_size[0], image_size[1], score_threshold=options.detection_threshold,
            logits_names=profile.outputs[:half], offsets_names=profile.outputs[half:],
        )
        return Prediction(detections=detections)
    return Prediction(labels=classify(profile, outputs, options.top_k))


def classify(profile: ModelProfile, outputs: dict[str, npt.NDArray[np.float32]], k: int) -> list[Label]:
    """The top-k labels of a classification profile's single output tensor."""
    name = profile.outputs[0]
    if name not in outputs:
        raise PermanentError(
            RejectionCode.BAD_MODEL_OUTPUT, f"the service returned {sorted(outputs)}, not {name!r}"
        )
    return top_k(outputs[name], class_names(profile.label_set), k, are_logits=profile.kind is OutputKind.LOGITS)
