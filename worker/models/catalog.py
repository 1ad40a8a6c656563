"""The catalog of model profiles: output tensor names, output kind and label set per FPGA model."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from worker.errors import ConfigurationError


class OutputKind(StrEnum):
    """What the model's output tensors hold."""

    SOFTMAX = "softmax"
    LOGITS = "logits"
    SSD = "ssd"


class LabelSet(StrEnum):
    """The class names a profile's class ids index into."""

    IMAGENET_1K = "imagenet1k"
    PASCAL_VOC_21 = "voc21"


# The string placeholder every Azure ML accelerated-models graph is fed through (and the Edge sample's default).
DEFAULT_INPUT_NAME = "Placeholder:0"

SSD_LAYERS: tuple[str, ...] = ("block4", "block7", "block8", "block9", "block10", "block11")
SSD_GRID_SIZES: tuple[int, ...] = (37, 19, 10, 5, 3, 1)
SSD_ANCHORS_PER_CELL: tuple[int, ...] = (4, 6, 6, 6, 4, 4)
SSD_NUM_CLASSES = 21


def ssd_logits_name(layer: str) -> str:
    """Name of the class-logits tensor of one SSD-VGG feature layer."""
    return f"ssd_300_vgg/{layer}_box/Reshape_1:0"


def ssd_offsets_name(layer: str) -> str:
    """Name of the box-offsets tensor of one SSD-VGG feature layer."""
    return f"ssd_300_vgg/{layer}_box/Reshape:0"


@dataclass(frozen=True)
class ModelProfile:
    """One model the scoring service can run, as the worker needs to know it."""

    name: str
    kind: OutputKind
    outputs: tuple[str, ...]
    label_set: LabelSet

    def with_outputs(self, outputs: tuple[str, ...] | None) -> ModelProfile:
        """The same profile with its output tensor names overridden (e.g. the Edge deployment's names)."""
        if not outputs:
            return self
        if len(outputs) != len(self.outputs):
            raise ValueError(f"profile {self.name} has {len(self.outputs)} outputs, got {len(outputs)} names")
        return ModelProfile(self.name, self.kind, tuple(outputs), self.label_set)


def _ssd_outputs() -> tuple[str, ...]:
    logits = tuple(ssd_logits_name(layer) for layer in SSD_LAYERS)
    offsets = tuple(ssd_offsets_name(layer) for layer in SSD_LAYERS)
    return logits + offsets


PROFILES: dict[str, ModelProfile] = {
    profile.name: profile
    for profile in (
        ModelProfile(
            "resnet50", OutputKind.SOFTMAX, ("classifier_1/resnet_v1_50/predictions/Softmax:0",),
            LabelSet.IMAGENET_1K,
        ),
        ModelProfile(
            "resnet152", OutputKind.SOFTMAX, ("classifier/resnet_v1_152/predictions/Softmax:0",),
            LabelSet.IMAGENET_1K,
        ),
        ModelProfile(
            "densenet121", OutputKind.SOFTMAX, ("classifier/densenet121/predictions/Softmax:0",),
            LabelSet.IMAGENET_1K,
        ),
        ModelProfile("vgg16", OutputKind.LOGITS, ("classifier/vgg_16/fc8/squeezed:0",), LabelSet.IMAGENET_1K),
        ModelProfile("ssd_vgg", OutputKind.SSD, _ssd_outputs(), LabelSet.PASCAL_VOC_21),
    )
}


def get_profile(name: str) -> ModelProfile:
    """The profile called `name`, or a ConfigurationError listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown model profile {name!r} (BLOBSCORE_SCORING_MODEL, a service's model, or --model); "
            f"known: {', '.join(sorted(PROFILES))}"
        ) from None
