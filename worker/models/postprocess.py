"""From a profile's output tensors to the labels of one image (pure)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from worker.errors import ConfigurationError, PermanentError, RejectionCode
from worker.models.catalog import ModelProfile, OutputKind
from worker.models.classification import Label, top_k
from worker.models.labels import class_names


def classify(profile: ModelProfile, outputs: dict[str, npt.NDArray[np.float32]], k: int) -> list[Label]:
    """The top-k labels of a classification profile's single output tensor."""
    if profile.kind is OutputKind.SSD:
        raise ConfigurationError(f"profile {profile.name} is a detector, not a classifier")
    name = profile.outputs[0]
    if name not in outputs:
        raise PermanentError(
            RejectionCode.BAD_MODEL_OUTPUT, f"the service returned {sorted(outputs)}, not {name!r}"
        )
    return top_k(outputs[name], class_names(profile.label_set), k, are_logits=profile.kind is OutputKind.LOGITS)
