"""Byte-level compatibility of worker.wire's lean messages with the official tensorflow-serving-api classes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib
import tensorflow as tf
from google.protobuf import any_pb2
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2

from worker import wire
from worker.models.catalog import PROFILES
from worker.protos import tf_serving_pb2 as lean

pytestmark = pytest.mark.wire

RESNET50_OUTPUT = PROFILES["resnet50"].outputs[0]


@pytest.fixture(scope="module")
def jpeg_bytes() -> bytes:
    """A real photograph (Grace Hopper) that matplotlib ships as sample data."""
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    data = path.read_bytes()
    assert data[:3] == b"\xff\xd8\xff"
    return data


def official_image_request(data: bytes, input_name: str) -> predict_pb2.PredictRequest:
    """The request azureml.accel.PredictionClient.score_tensors builds for one image file."""
    request = predict_pb2.PredictRequest()
    request.inputs[input_name].string_val.append(data)
    request.inputs[input_name].dtype = types_pb2.DT_STRING
    request.inputs[input_name].tensor_shape.dim.extend([tensor_shape_pb2.TensorShapeProto.Dim(size=1)])
    return request


def test_data_type_values_match_the_official_enum() -> None:
    ours = {value.name: value.number for value in lean.DataType.DESCRIPTOR.values}
    official = {value.name: value.number for value in types_pb2.DataType.DESCRIPTOR.values}
    assert ours.items() <= official.items()
    assert ours["DT_STRING"] == 7
    assert ours["DT_FLOAT"] == 1


def test_our_image_request_is_byte_identical_to_the_official_one(jpeg_bytes: bytes) -> None:
    ours = wire.image_request(jpeg_bytes, "images").SerializeToString()
    official = official_image_request(jpeg_bytes, "images").SerializeToString()
    assert ours == official
    assert (
        wire.string_input(jpeg_bytes).SerializeToString()
        == official_image_request(jpeg_bytes, "x").inputs["x"].SerializeToString()
    )


# Sizes around every varint length boundary of the image's and the enclosing messages' length prefixes.
@pytest.mark.parametrize("size", [0, 1, 100, 127, 128, 16_370, 16_383, 16_384, 2_097_140, 2_097_152, 6_000_000])
@pytest.mark.parametrize("input_name", ["Placeholder:0", "images", "", "é" * 130])
def test_the_hand_encoded_request_is_byte_identical_to_the_official_one(size: int, input_name: str) -> None:
    image = bytes(range(256)) * (size // 256) + bytes(size % 256)
    encoded = wire.encoded_image_request(image, input_name)
    assert encoded == official_image_request(image, input_name).SerializeToString()
    assert encoded == wire.image_request(image, input_name).SerializeToString()


def test_the_hand_encoded_request_parses_with_the_official_class(jpeg_bytes: bytes) -> None:
    parsed = predict_pb2.PredictRequest.FromString(wire.encoded_image_request(jpeg_bytes, "Placeholder:0"))
    tensor = parsed.inputs["Placeholder:0"]
    assert list(parsed.inputs) == ["Placeholder:0"]
    assert tensor.dtype == types_pb2.DT_STRING
    assert [dim.size for dim in tensor.tensor_shape.dim] == [1]
    assert tf.make_ndarray(tensor).tolist() == [jpeg_bytes]


def test_our_request_parses_with_the_official_class(jpeg_bytes: bytes) -> None:
    request = wire.image_request(jpeg_bytes, "Placeholder:0", output_filter=[RESNET50_OUTPUT], model_name="m")
    request.model_spec.version.value = 3
    parsed = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    tensor = parsed.inputs["Placeholder:0"]
    assert list(parsed.inputs) == ["Placeholder:0"]
    assert tensor.dtype == types_pb2.DT_STRING
    assert [dim.size for dim in tensor.tensor_shape.dim] == [1]
    assert list(tensor.string_val) == [jpeg_bytes]
    assert list(parsed.output_filter) == [RESNET50_OUTPUT]
    assert parsed.model_spec.name == "m"
    assert parsed.model_spec.version.value == 3
    assert parsed.model_spec.WhichOneof("version_choice") == "version"
    assert tf.make_ndarray(tensor).tolist() == [jpeg_bytes]


def test_the_official_request_parses_with_our_class(jpeg_bytes: bytes) -> None:
    official = official_image_request(jpeg_bytes, "images")
    official.output_filter.append(RESNET50_OUTPUT)
    official.model_spec.signature_name = "serving_default"
    ours = lean.PredictRequest.FromString(official.SerializeToString())
    tensor = ours.inputs["images"]
    assert tensor.dtype == lean.DT_STRING
    assert [dim.size for dim in tensor.tensor_shape.dim] == [1]
    assert list(tensor.string_val) == [jpeg_bytes]
    assert list(ours.output_filter) == [RESNET50_OUTPUT]
    assert ours.model_spec.signature_name == "serving_default"
    assert ours.SerializeToString() == official.SerializeToString()


def official_response(tensor: tensor_pb2.TensorProto) -> bytes:
    response = predict_pb2.PredictResponse()
    response.outputs[RESNET50_OUTPUT].CopyFrom(tensor)
    response.model_spec.name = "resnet50"
    return response.SerializeToString()


def read_with_our_classes(payload: bytes) -> np.ndarray:
    response = lean.PredictResponse.FromString(payload)
    assert response.model_spec.name == "resnet50"
    return wire.tensor_to_ndarray(response.outputs[RESNET50_OUTPUT])


def softmax_row() -> np.ndarray:
    logits = np.random.default_rng(7).normal(size=(1, 1000)).astype(np.float32)
    exp = np.exp(logits - logits.max())
    return (exp / exp.sum()).astype(np.float32)


def test_official_tensor_content_outputs_read_exactly() -> None:
    expected = softmax_row()
    official = tf.make_tensor_proto(expected)
    assert official.tensor_content  # numpy arrays go out as tensor_content
    got = read_with_our_classes(official_response(official))
    assert got.dtype == np.float32
    assert got.shape == (1, 1000)
    np.testing.assert_array_equal(got, expected)


def test_official_float_val_outputs_read_exactly() -> None:
    expected = softmax_row()
    official = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=expected.ravel().tolist())
    official.tensor_shape.dim.extend([tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in expected.shape])
    got = read_with_our_classes(official_response(official))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, tf.make_ndarray(official))


@pytest.mark.parametrize("values", [[0.25, 0.5], [], [1.5]], ids=["trailing-repeats", "all-zero", "splat"])
def test_compressed_float_val_reads_like_tensorflow(values: list[float]) -> None:
    official = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=values)
    official.tensor_shape.dim.extend([tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in (2, 3)])
    got = read_with_our_classes(official_response(official))
    np.testing.assert_array_equal(got, tf.make_ndarray(official))


def test_our_outputs_read_with_the_official_class() -> None:
    expected = np.random.default_rng(3).normal(size=(1, 37, 37, 4, 21)).astype(np.float32)
    response = lean.PredictResponse()
    response.outputs["ssd_300_vgg/block4_box/Reshape_1:0"].CopyFrom(wire.ndarray_to_tensor(expected))
    parsed = predict_pb2.PredictResponse.FromString(response.SerializeToString())
    tensor = parsed.outputs["ssd_300_vgg/block4_box/Reshape_1:0"]
    assert tensor.dtype == types_pb2.DT_FLOAT
    np.testing.assert_array_equal(tf.make_ndarray(tensor), expected)


def test_float64_input_is_stored_as_float32() -> None:
    tensor = wire.ndarray_to_tensor(np.array([[0.5, 0.25]], dtype=np.float64))
    parsed = tensor_pb2.TensorProto.FromString(tensor.SerializeToString())
    assert tf.make_ndarray(parsed).dtype == np.float32
    np.testing.assert_array_equal(tf.make_ndarray(parsed), np.array([[0.5, 0.25]], dtype=np.float32))


def lean_signature_map() -> lean.SignatureDefMap:
    signature = lean.SignatureDef(method_name=wire.PREDICT_METHOD_NAME)
    signature.inputs["images"].name = "Placeholder:0"
    signature.inputs["images"].dtype = lean.DT_STRING
    signature.inputs["images"].tensor_shape.dim.add(size=-1)
    output = signature.outputs[RESNET50_OUTPUT]
    output.name = RESNET50_OUTPUT
    output.dtype = lean.DT_FLOAT
    output.tensor_shape.dim.add(size=-1)
    output.tensor_shape.dim.add(size=1000)
    signatures = lean.SignatureDefMap()
    signatures.signature_def[wire.DEFAULT_SIGNATURE].CopyFrom(signature)
    return signatures


def test_our_metadata_unpacks_with_the_official_classes() -> None:
    response = lean.GetModelMetadataResponse()
    response.model_spec.name = "resnet50"
    response.model_spec.version.value = 1
    response.metadata[wire.SIGNATURE_DEF_METADATA_FIELD].CopyFrom(wire.pack_signature_def_map(lean_signature_map()))
    parsed = get_model_metadata_pb2.GetModelMetadataResponse.FromString(response.SerializeToString())
    packed = parsed.metadata["signature_def"]
    official_map = get_model_metadata_pb2.SignatureDefMap()
    assert packed.Is(official_map.DESCRIPTOR)
    assert packed.Unpack(official_map)
    signature = official_map.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    assert signature.inputs["images"].name == "Placeholder:0"
    assert signature.inputs["images"].dtype == types_pb2.DT_STRING
    assert [d.size for d in signature.outputs[RESNET50_OUTPUT].tensor_shape.dim] == [-1, 1000]
    assert parsed.model_spec.version.value == 1


def test_official_metadata_unpacks_with_our_classes() -> None:
    info = meta_graph_pb2.TensorInfo(name=RESNET50_OUTPUT, dtype=types_pb2.DT_FLOAT)
    official_map = get_model_metadata_pb2.SignatureDefMap()
    official_map.signature_def["serving_default"].outputs["probs"].CopyFrom(info)
    packed = any_pb2.Any()
    packed.Pack(official_map)
    assert packed.type_url == wire.SIGNATURE_DEF_MAP_TYPE_URL
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.metadata["signature_def"].CopyFrom(packed)
    ours = lean.GetModelMetadataResponse.FromString(response.SerializeToString())
    unpacked = wire.unpack_signature_def_map(ours.metadata["signature_def"])
    assert unpacked.signature_def["serving_default"].outputs["probs"].name == RESNET50_OUTPUT
    assert unpacked.signature_def["serving_default"].outputs["probs"].dtype == lean.DT_FLOAT


def test_unpacking_another_type_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="SignatureDefMap"):
        wire.unpack_signature_def_map(any_pb2.Any(type_url="type.googleapis.com/google.protobuf.Int64Value"))


def test_tensor_content_of_the_wrong_length_is_a_value_error() -> None:
    tensor = wire.ndarray_to_tensor(np.zeros((1, 1000), dtype=np.float32))
    tensor.tensor_shape.dim[1].size = 1001
    with pytest.raises(ValueError, match="4000 bytes"):
        wire.tensor_to_ndarray(tensor)


def test_too_many_float_vals_is_a_value_error() -> None:
    tensor = lean.TensorProto(dtype=lean.DT_FLOAT, float_val=[1.0, 2.0, 3.0])
    tensor.tensor_shape.dim.add(size=2)
    with pytest.raises(ValueError, match="3 values"):
        wire.tensor_to_ndarray(tensor)


def test_a_non_float_tensor_is_a_value_error(jpeg_bytes: bytes) -> None:
    with pytest.raises(ValueError, match="DT_FLOAT"):
        wire.tensor_to_ndarray(wire.string_input(jpeg_bytes))


def test_an_undefined_shape_is_a_value_error() -> None:
    tensor = wire.ndarray_to_tensor(np.zeros((1, 4), dtype=np.float32))
    tensor.tensor_shape.dim[0].size = -1
    with pytest.raises(ValueError, match="not fully defined"):
        wire.tensor_to_ndarray(tensor)


def test_call_metadata_matches_the_azureml_client() -> None:
    assert wire.call_metadata("k3y", "my-svc") == (
        ("authorization", "Bearer k3y"),
        ("x-ms-aml-grpc-service-route", "/api/v1/service/my-svc"),
    )
    assert wire.call_metadata() == ()
