"""The TF-Serving PredictionService wire protocol without TensorFlow: method paths, call metadata, tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from math import prod

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import any_pb2

from worker.protos.tf_serving_pb2 import (
    DT_FLOAT,
    DT_STRING,
    GetModelMetadataRequest,
    GetModelMetadataResponse,
    PredictRequest,
    PredictResponse,
    SignatureDefMap,
    TensorProto,
)

SERVICE_NAME = "tensorflow.serving.PredictionService"
PREDICT_METHOD = f"/{SERVICE_NAME}/Predict"
GET_MODEL_METADATA_METHOD = f"/{SERVICE_NAME}/GetModelMetadata"

# The headers the Azure ML accelerated-models gateway reads (as azureml.accel.PredictionClient sends them).
AUTHORIZATION_HEADER = "authorization"
SERVICE_ROUTE_HEADER = "x-ms-aml-grpc-service-route"

SIGNATURE_DEF_METADATA_FIELD = "signature_def"
# TF Serving packs the SignatureDefMap under the official type's name; our message has another package.
SIGNATURE_DEF_MAP_TYPE_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
PREDICT_METHOD_NAME = "tensorflow/serving/predict"
DEFAULT_SIGNATURE = "serving_default"

FloatArray = npt.NDArray[np.float32]
CallMetadata = tuple[tuple[str, str], ...]
PredictFn = Callable[[PredictRequest, grpc.ServicerContext], PredictResponse]
MetadataFn = Callable[[GetModelMetadataRequest, grpc.ServicerContext], GetModelMetadataResponse]

_LITTLE_ENDIAN_FLOAT32 = np.dtype("<f4")


def service_route(service_name: str) -> str:
    """The value of the service-route header that addresses the Azure ML web service `service_name`."""
    return f"/api/v1/service/{service_name}"


def bearer(key: str) -> str:
    """The value of the authorization header for an Azure ML service key."""
    return f"Bearer {key}"


def call_metadata(key: str | None = None, service_name: str | None = None) -> CallMetadata:
    """The per-call gRPC metadata the Azure ML service expects; empty parts are left out."""
    pairs: list[tuple[str, str]] = []
    if key:
        pairs.append((AUTHORIZATION_HEADER, bearer(key)))
    if service_name:
        pairs.append((SERVICE_ROUTE_HEADER, service_route(service_name)))
    return tuple(pairs)


def predict_callable(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    """A callable for PredictionService/Predict on `channel`: PredictRequest in, PredictResponse out."""
    return channel.unary_unary(
        PREDICT_METHOD,
        request_serializer=PredictRequest.SerializeToString,
        response_deserializer=PredictResponse.FromString,
    )


def metadata_callable(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    """A callable for PredictionService/GetModelMetadata on `channel`."""
    return channel.unary_unary(
        GET_MODEL_METADATA_METHOD,
        request_serializer=GetModelMetadataRequest.SerializeToString,
        response_deserializer=GetModelMetadataResponse.FromString,
    )


def string_input(data: bytes) -> TensorProto:
    """A DT_STRING tensor of shape [1] holding `data`: how an encoded image is fed to the service."""
    tensor = TensorProto(dtype=DT_STRING, string_val=[data])
    tensor.tensor_shape.dim.add(size=1)
    return tensor


def image_request(
    image_bytes: bytes,
    input_name: str,
    output_filter: Iterable[str] = (),
    model_name: str = "",
) -> PredictRequest:
    """A PredictRequest for one encoded image, built in place (no copy into a sub-message)."""
    request = PredictRequest(output_filter=output_filter)
    if model_name:
        request.model_spec.name = model_name
    tensor = request.inputs[input_name]
    tensor.dtype = DT_STRING
    tensor.tensor_shape.dim.add(size=1)
    tensor.string_val.append(image_bytes)
    return request


# The PredictRequest of one image, spelled out in protobuf's wire format (what SerializeToString writes, byte for
# byte): field 2 `inputs` holds one map entry {1: key, 2: TensorProto {1: dtype DT_STRING, 2: shape {2: dim {1: 1}},
# 8: string_val [image]}}. Everything but the image is a few dozen bytes; only the length prefixes depend on it.
_LEN = 2  # protobuf wire type of a length-delimited field
_REQUEST_INPUTS = bytes([2 << 3 | _LEN])
_ENTRY_KEY = bytes([1 << 3 | _LEN])
_ENTRY_VALUE = bytes([2 << 3 | _LEN])
_STRING_TENSOR_HEAD = bytes([1 << 3, DT_STRING, 2 << 3 | _LEN, 4, 2 << 3 | _LEN, 2, 1 << 3, 1, 8 << 3 | _LEN])


def _varint(value: int) -> bytes:
    """`value` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encoded_image_request(image_bytes: bytes, input_name: str) -> bytes:
    """The serialized PredictRequest for one encoded image: `image_request(...).SerializeToString()`, byte for byte,
    with the image copied once.

    Building the message copies the image into protobuf's arena and serializing copies it again (upb's encoder
    also grows its buffer as it goes): ~0.5 ms of CPU per MB, with the GIL held, on top of gRPC's own copy into
    its send buffer. Writing the few header bytes around the image ourselves leaves one `join`; send the result
    with `predict_bytes_callable` (no serializer).
    """
    key = input_name.encode("utf-8")
    image_length = _varint(len(image_bytes))
    tensor_size = len(_STRING_TENSOR_HEAD) + len(image_length) + len(image_bytes)
    entry_head = b"".join((_ENTRY_KEY, _varint(len(key)), key, _ENTRY_VALUE, _varint(tensor_size)))
    return b"".join((_REQUEST_INPUTS, _varint(len(entry_head) + tensor_size), entry_head, _STRING_TENSOR_HEAD,
                     image_length, image_bytes))


def predict_bytes_callable(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    """Like `predict_callable`, but taking the request already serialized (`encoded_image_request`)."""
    return channel.unary_unary(
        PREDICT_METHOD, request_serializer=None, response_deserializer=PredictResponse.FromString
    )


def tensor_shape(tensor: TensorProto) -> tuple[int, ...]:
    """The fully defined shape of `tensor`; ValueError for an unknown rank or a negative dimension."""
    if tensor.tensor_shape.unknown_rank:
        raise ValueError("tensor has unknown rank")
    shape = tuple(dim.size for dim in tensor.tensor_shape.dim)
    if any(size < 0 for size in shape):
        raise ValueError(f"tensor shape {list(shape)} is not fully defined")
    return shape


def tensor_to_ndarray(tensor: TensorProto) -> FloatArray:
    """The float32 array a DT_FLOAT tensor holds, from tensor_content or float_val, in the tensor's shape.

    float_val follows TensorFlow's make_ndarray: fewer values than elements repeat the last one (TF
    compresses trailing repeats that way) and no values at all mean zeros. Anything else that does not
    fit the shape is a ValueError naming both sizes.
    """
    if tensor.dtype != DT_FLOAT:
        raise ValueError(f"expected a DT_FLOAT tensor, got dtype {tensor.dtype}")
    shape = tensor_shape(tensor)
    count = prod(shape)
    if tensor.tensor_content:
        return _from_content(tensor.tensor_content, shape, count)
    return _from_float_val(tensor.float_val, shape, count)


def _from_content(content: bytes, shape: tuple[int, ...], count: int) -> FloatArray:
    if len(content) != count * _LITTLE_ENDIAN_FLOAT32.itemsize:
        raise ValueError(f"tensor_content has {len(content)} bytes, shape {list(shape)} needs {count * 4}")
    array = np.frombuffer(content, dtype=_LITTLE_ENDIAN_FLOAT32).reshape(shape)
    return array.astype(np.float32, copy=False)


def _from_float_val(values: Sequence[float], shape: tuple[int, ...], count: int) -> FloatArray:
    given = len(values)
    if given == count:
        return np.array(values, dtype=np.float32).reshape(shape)
    if given > count:
        raise ValueError(f"float_val has {given} values, shape {list(shape)} holds {count}")
    if given == 0:
        return np.zeros(shape, dtype=np.float32)
    padded = np.empty(count, dtype=np.float32)
    padded[:given] = values
    padded[given:] = values[-1]
    return padded.reshape(shape)


def ndarray_to_tensor(array: npt.ArrayLike) -> TensorProto:
    """A DT_FLOAT tensor of `array`'s shape with its values as little-endian float32 in tensor_content."""
    values = np.ascontiguousarray(array, dtype=_LITTLE_ENDIAN_FLOAT32)
    tensor = TensorProto(dtype=DT_FLOAT, tensor_content=values.tobytes())
    for size in values.shape:
        tensor.tensor_shape.dim.add(size=size)
    return tensor


def pack_signature_def_map(signatures: SignatureDefMap) -> any_pb2.Any:
    """`signatures` in an Any under the official type URL, as TF Serving sends it."""
    return any_pb2.Any(type_url=SIGNATURE_DEF_MAP_TYPE_URL, value=signatures.SerializeToString())


def unpack_signature_def_map(packed: any_pb2.Any) -> SignatureDefMap:
    """The SignatureDefMap inside a GetModelMetadata Any; ValueError if the Any holds another type."""
    if packed.type_url.rpartition("/")[2] != "tensorflow.serving.SignatureDefMap":
        raise ValueError(f"expected a tensorflow.serving.SignatureDefMap, got {packed.type_url!r}")
    return SignatureDefMap.FromString(packed.value)


def prediction_service_handler(predict_fn: PredictFn, metadata_fn: MetadataFn) -> grpc.GenericRpcHandler:
    """A server-side handler serving Predict and GetModelMetadata with our lean messages."""
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Predict": grpc.unary_unary_rpc_method_handler(
                predict_fn,
                request_deserializer=PredictRequest.FromString,
                response_serializer=PredictResponse.SerializeToString,
            ),
            "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
                metadata_fn,
                request_deserializer=GetModelMetadataRequest.FromString,
                response_serializer=GetModelMetadataResponse.SerializeToString,
            ),
        },
    )
