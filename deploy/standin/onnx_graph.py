"""Build an EfficientNet-Lite0 ONNX graph from its state-dict arrays (batch norm folded, TF "SAME" pads).

The state dict uses the key names of the EfficientNet-PyTorch port of the TensorFlow model
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...). The graph takes float32 images in
NCHW layout, shape ``[N, 3, 224, 224]``, already normalised as ``(rgb - 127) / 128``, and returns
float32 ImageNet-1k logits of shape ``[N, 1000]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
IMAGE_SIZE = 224
NUM_CLASSES = 1000
OPSET = 17
# The TensorFlow checkpoint these weights were converted from trains batch norm with this epsilon.
BATCH_NORM_EPSILON = 1e-3
# ReLU6 bounds, written as a Clip.
RELU6_MIN, RELU6_MAX = 0.0, 6.0

Array = np.ndarray[Any, Any]


class GraphBuildError(ValueError):
    """The arrays do not hold the EfficientNet-Lite0 layers the graph needs."""


@dataclass(frozen=True)
class Stage:
    """One stage of MBConv blocks: its first block may stride; the rest keep size and add a residual."""

    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    out_channels: int


# EfficientNet-Lite0 (width 1.0, depth 1.0): the same stages as B0, without squeeze-excite.
LITE0_STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 1, 16),
    Stage(2, 3, 2, 6, 24),
    Stage(2, 5, 2, 6, 40),
    Stage(3, 3, 2, 6, 80),
    Stage(3, 5, 1, 6, 112),
    Stage(4, 5, 2, 6, 192),
    Stage(1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) for one spatial axis; the odd pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def fold_batch_norm(
    weight: Array, gamma: Array, beta: Array, mean: Array, var: Array, eps: float = BATCH_NORM_EPSILON
) -> tuple[Array, Array]:
    """Fold an inference-mode batch norm that follows a bias-free conv into the conv's weight and bias."""
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    folded_weight = weight.astype(np.float64) * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    folded_bias = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return folded_weight.astype(np.float32), folded_bias.astype(np.float32)


@dataclass
class _GraphBuilder:
    """Accumulates nodes and initializers while tracking the current spatial size for static pads."""

    weights: Mapping[str, Array]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    size: int = IMAGE_SIZE

    def array(self, key: str, shape: tuple[int, ...] | None = None) -> Array:
        """One state-dict array, checked for presence and (optionally) shape."""
        try:
            value = np.asarray(self.weights[key])
        except KeyError:
            raise GraphBuildError(f"weights lack {key!r}: not an EfficientNet-Lite0 state dict") from None
        if shape is not None and value.shape != shape:
            raise GraphBuildError(f"{key} has shape {value.shape}, expected {shape}")
        return value

    def constant(self, name: str, value: Array) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def conv_bn(
        self, x: str, conv: str, bn: str, out_ch: int, in_ch: int, kernel: int, stride: int, groups: int = 1,
        relu6: bool = True,
    ) -> str:
        """Conv (batch norm folded in), with TF "SAME" pads, optionally followed by ReLU6."""
        weight = self.array(f"{conv}.weight", (out_ch, in_ch // groups, kernel, kernel))
        folded_w, folded_b = fold_batch_norm(
            weight,
            self.array(f"{bn}.weight", (out_ch,)),
            self.array(f"{bn}.bias", (out_ch,)),
            self.array(f"{bn}.running_mean", (out_ch,)),
            self.array(f"{bn}.running_var", (out_ch,)),
        )
        before, after = same_pads(self.size, kernel, stride)
        out = f"{conv}.out"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self.constant(f"{conv}.w", folded_w), self.constant(f"{conv}.b", folded_b)],
                [out],
                name=conv,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[before, before, after, after],
                group=groups,
            )
        )
        self.size = -(-self.size // stride)
        return self.relu6(out, conv) if relu6 else out

    def relu6(self, x: str, prefix: str) -> str:
        out = f"{prefix}.relu6"
        low = self.constant(f"{prefix}.clip_min", np.array(RELU6_MIN, dtype=np.float32))
        high = self.constant(f"{prefix}.clip_max", np.array(RELU6_MAX, dtype=np.float32))
        self.nodes.append(helper.make_node("Clip", [x, low, high], [out], name=f"{prefix}.Clip"))
        return out

    def mbconv(self, x: str, index: int, in_ch: int, stage: Stage, stride: int) -> str:
        """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project, residual if shapes allow."""
        prefix = f"_blocks.{index}"
        hidden = in_ch * stage.expand_ratio
        y = x
        if stage.expand_ratio != 1:
            y = self.conv_bn(y, f"{prefix}._expand_conv", f"{prefix}._bn0", hidden, in_ch, 1, 1)
        y = self.conv_bn(
            y, f"{prefix}._depthwise_conv", f"{prefix}._bn1", hidden, hidden, stage.kernel, stride,
            groups=hidden,
        )
        y = self.conv_bn(
            y, f"{prefix}._project_conv", f"{prefix}._bn2", stage.out_channels, hidden, 1, 1, relu6=False
        )
        if stride == 1 and in_ch == stage.out_channels:
            out = f"{prefix}.residual"
            self.nodes.append(helper.make_node("Add", [y, x], [out], name=f"{prefix}.Add"))
            return out
        return y

    def classifier_head(self, x: str, in_ch: int) -> str:
        """Head 1x1 conv, global average pool and the fully connected layer to logits."""
        y = self.conv_bn(x, "_conv_head", "_bn1", HEAD_CHANNELS, in_ch, 1, 1)
        self.nodes.append(helper.make_node("GlobalAveragePool", [y], ["pooled"], name="pool"))
        self.nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], name="flatten", axis=1))
        fc_w = self.array("_fc.weight", (NUM_CLASSES, HEAD_CHANNELS)).astype(np.float32)
        fc_b = self.array("_fc.bias", (NUM_CLASSES,)).astype(np.float32)
        inputs = ["features", self.constant("_fc.w", fc_w), self.constant("_fc.b", fc_b)]
        self.nodes.append(helper.make_node("Gemm", inputs, [OUTPUT_NAME], name="fc", transB=1))
        return OUTPUT_NAME


def _check_block_count(weights: Mapping[str, Array]) -> None:
    expected = sum(stage.repeats for stage in LITE0_STAGES)
    present = {key.split(".")[1] for key in weights if key.startswith("_blocks.")}
    if len(present) != expected:
        raise GraphBuildError(f"weights have {len(present)} MBConv blocks, EfficientNet-Lite0 has {expected}")


def build_efficientnet_lite0(weights: Mapping[str, Array]) -> onnx.ModelProto:
    """Build the EfficientNet-Lite0 inference graph (NCHW ``images`` in, ``logits`` out) from its arrays."""
    _check_block_count(weights)
    builder = _GraphBuilder(weights)
    x = builder.conv_bn(INPUT_NAME, "_conv_stem", "_bn0", STEM_CHANNELS, 3, 3, 2)
    in_ch, index = STEM_CHANNELS, 0
    for stage in LITE0_STAGES:
        for repeat in range(stage.repeats):
            x = builder.mbconv(x, index, in_ch, stage, stage.stride if repeat == 0 else 1)
            in_ch, index = stage.out_channels, index + 1
    builder.classifier_head(x, in_ch)
    graph = helper.make_graph(
        builder.nodes,
        "efficientnet_lite0",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", NUM_CLASSES])],
        builder.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="blobscore.deploy.standin"
    )
    model.ir_version = 8  # the IR of opset 17, which every onnxruntime since 1.13 reads
    onnx.checker.check_model(model)
    return model
