"""The stand-in scoring server as a real subprocess, over real gRPC channels: protocol, errors, TLS, faults."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import threading
import time
import types
import warnings
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import matplotlib
import numpy as np
import pytest
import skimage
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf
from standin_helpers import StandinProcess, start_standin, write_self_signed_cert
from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from deploy.standin.profiles import emulated_probabilities
from deploy.standin.server import EMULATION_METADATA_FIELD
from worker import wire
from worker.models.catalog import PROFILES, ssd_logits_name, ssd_offsets_name
from worker.protos import tf_serving_pb2 as lean

pytestmark = pytest.mark.integration

KEY = "s3cret-standin-key"
SERVICE = "my-fpga-service"
INPUT = "images"
RESNET50_OUTPUT = PROFILES["resnet50"].outputs[0]
VGG16_OUTPUT = PROFILES["vgg16"].outputs[0]
TIMEOUT_S = 30.0
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


# --------------------------------------------------------------------------------------------- images


def skimage_photo_as_jpeg(name: str) -> bytes:
    """A real photo from scikit-image's wheel, encoded as the JPEG a Blob container would hold."""
    path = Path(skimage.__file__).parent / "data" / f"{name}.png"
    buffer = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    """A real JPEG photograph shipped in matplotlib's wheel."""
    return (Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes()


@pytest.fixture(scope="module")
def chelsea() -> bytes:
    return skimage_photo_as_jpeg("chelsea")


@pytest.fixture(scope="module")
def coffee() -> bytes:
    return skimage_photo_as_jpeg("coffee")


def unique_jpeg(jpeg: bytes, tag: str) -> bytes:
    """The same photo with a distinct comment segment, so its sha256 is new to the server's stats."""
    marker = f"blobscore test {tag} {time.monotonic_ns()}".encode()
    segment = b"\xff\xfe" + (len(marker) + 2).to_bytes(2, "big") + marker
    return jpeg[:2] + segment + jpeg[2:]


# --------------------------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("standin")


def launch(workdir: Path, name: str, *args: str, env: dict[str, str] | None = None) -> Iterator[StandinProcess]:
    standin = start_standin(args, workdir / f"{name}.log", env)
    yield standin
    assert standin.stop() == 0, standin.log()


@pytest.fixture(scope="module")
def guarded(workdir: Path) -> Iterator[StandinProcess]:
    """Emulated resnet50 with a key (from the environment), a service route, an input name and call stats."""
    yield from launch(
        workdir, "guarded", "--model", "resnet50", "--no-model", "--emulate-latency-ms", "20",
        "--service-name", SERVICE, "--input-name", INPUT, "--stats-file", str(workdir / "stats.json"),
        env={"BLOBSCORE_STANDIN_KEY": KEY},
    )  # fmt: skip


@pytest.fixture(scope="module")
def open_vgg(workdir: Path) -> Iterator[StandinProcess]:
    """Emulated vgg16 with no key, route or input name, and an overridden output name."""
    yield from launch(workdir, "open_vgg", "--model", "vgg16", "--no-model", "--output-name", "edge/vgg16:0")


@pytest.fixture(scope="module")
def tls_server(workdir: Path) -> Iterator[tuple[StandinProcess, bytes]]:
    cert, key = write_self_signed_cert(workdir)
    for standin in launch(workdir, "tls", "--no-model", "--tls-cert", str(cert), "--tls-key", str(key)):
        yield standin, cert.read_bytes()


def ssd_replay_arrays() -> dict[str, np.ndarray]:
    from worker.models.catalog import SSD_ANCHORS_PER_CELL, SSD_GRID_SIZES, SSD_LAYERS, SSD_NUM_CLASSES

    rng = np.random.default_rng(11)
    arrays: dict[str, np.ndarray] = {}
    for layer, grid, anchors in zip(SSD_LAYERS, SSD_GRID_SIZES, SSD_ANCHORS_PER_CELL, strict=True):
        arrays[ssd_logits_name(layer)] = rng.normal(size=(1, grid, grid, anchors, SSD_NUM_CLASSES))
        arrays[ssd_offsets_name(layer)] = rng.normal(size=(1, grid, grid, anchors, 4))
    return {name: array.astype(np.float32) for name, array in arrays.items()}


@pytest.fixture(scope="module")
def ssd_server(workdir: Path) -> Iterator[StandinProcess]:
    replay = workdir / "ssd_replay.npz"
    np.savez(replay, **ssd_replay_arrays())  # type: ignore[arg-type]
    yield from launch(workdir, "ssd", "--model", "ssd_vgg", "--replay", str(replay))


@pytest.fixture(scope="module")
def failing(workdir: Path) -> Iterator[StandinProcess]:
    yield from launch(
        workdir, "failing", "--no-model", "--fail-rate", "1", "--fail-code", "RESOURCE_EXHAUSTED", "--delay-ms", "300"
    )


@pytest.fixture(scope="module")
def real_resnet50(workdir: Path) -> Iterator[StandinProcess]:
    yield from launch(workdir, "real_resnet50", "--model", "resnet50", "--input-name", INPUT)


@pytest.fixture(scope="module")
def real_vgg16(workdir: Path) -> Iterator[StandinProcess]:
    yield from launch(workdir, "real_vgg16", "--model", "vgg16")


# --------------------------------------------------------------------------------------------- clients


@pytest.fixture(scope="module")
def channels() -> Iterator[dict[str, grpc.Channel]]:
    opened: dict[str, grpc.Channel] = {}
    yield opened
    for channel in opened.values():
        channel.close()


def channel_to(channels: dict[str, grpc.Channel], standin: StandinProcess) -> grpc.Channel:
    if standin.address not in channels:
        channels[standin.address] = grpc.insecure_channel(standin.address)
    return channels[standin.address]


def predict(
    channel: grpc.Channel, request: lean.PredictRequest, metadata: wire.CallMetadata = ()
) -> lean.PredictResponse:
    response: lean.PredictResponse = wire.predict_callable(channel)(request, timeout=TIMEOUT_S, metadata=metadata)
    return response


def rpc_error(channel: grpc.Channel, request: lean.PredictRequest, metadata: wire.CallMetadata = ()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        predict(channel, request, metadata)
    return caught.value


GOOD_METADATA = wire.call_metadata(KEY, SERVICE)


def scores(response: lean.PredictResponse, name: str = RESNET50_OUTPUT) -> np.ndarray:
    array = wire.tensor_to_ndarray(response.outputs[name])
    assert array.shape == (1, 1000)
    return array[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits.astype(np.float64) - logits.max())
    return exp / exp.sum()


# --------------------------------------------------------------------------------------------- guarded server


def test_a_good_request_is_answered_with_the_profile_output(
    guarded: StandinProcess, channels: dict[str, grpc.Channel], jpeg: bytes
) -> None:
    started = time.monotonic()
    response = predict(channel_to(channels, guarded), wire.image_request(jpeg, INPUT), GOOD_METADATA)
    assert time.monotonic() - started >= 0.02  # --emulate-latency-ms 20
    assert list(response.outputs) == [RESNET50_OUTPUT]
    got = scores(response)
    np.testing.assert_array_equal(got, emulated_probabilities(jpeg))
    assert abs(float(got.sum()) - 1.0) < 1e-4
    assert response.model_spec.name == "resnet50"


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        (wire.call_metadata("wrong-key", SERVICE), grpc.StatusCode.UNAUTHENTICATED),
        (wire.call_metadata(KEY[:-1], SERVICE), grpc.StatusCode.UNAUTHENTICATED),
        (
            (("authorization", KEY), (wire.SERVICE_ROUTE_HEADER, wire.service_route(SERVICE))),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (wire.call_metadata(KEY), grpc.StatusCode.NOT_FOUND),
        (wire.call_metadata(KEY, "other-service"), grpc.StatusCode.NOT_FOUND),
    ],
    ids=["no-metadata", "wrong-key", "key-prefix", "no-bearer", "no-route", "wrong-route"],
)
def test_auth_and_route_errors(
    guarded: StandinProcess,
    channels: dict[str, grpc.Channel],
    jpeg: bytes,
    metadata: wire.CallMetadata,
    code: grpc.StatusCode,
) -> None:
    error = rpc_error(channel_to(channels, guarded), wire.image_request(jpeg, INPUT), metadata)
    assert error.code() is code


def float_input_request() -> lean.PredictRequest:
    request = lean.PredictRequest()
    request.inputs[INPUT].CopyFrom(wire.ndarray_to_tensor(np.zeros((1, 224, 224, 3), dtype=np.float32)))
    return request


def batch_of_two(jpeg: bytes) -> lean.PredictRequest:
    request = lean.PredictRequest()
    tensor = request.inputs[INPUT]
    tensor.dtype = lean.DT_STRING
    tensor.tensor_shape.dim.add(size=2)
    tensor.string_val.extend([jpeg, jpeg])
    return request


def two_values_in_shape_one(jpeg: bytes) -> lean.PredictRequest:
    request = wire.image_request(jpeg, INPUT)
    request.inputs[INPUT].string_val.append(jpeg)
    return request


def scalar_string(jpeg: bytes) -> lean.PredictRequest:
    request = wire.image_request(jpeg, INPUT)
    request.inputs[INPUT].tensor_shape.ClearField("dim")
    return request


BAD_REQUESTS = {
    "wrong-dtype": lambda jpeg: float_input_request(),
    "batch-2": batch_of_two,
    "two-values-in-shape-1": two_values_in_shape_one,
    "scalar-shape": scalar_string,
    "garbage-bytes": lambda jpeg: wire.image_request(b"this is not an image at all" * 40, INPUT),
    "empty-bytes": lambda jpeg: wire.image_request(b"", INPUT),
    "truncated-jpeg": lambda jpeg: wire.image_request(jpeg[: len(jpeg) // 2], INPUT),
    "jpeg-missing-its-tail": lambda jpeg: wire.image_request(jpeg[:-64], INPUT),
    "missing-input": lambda jpeg: lean.PredictRequest(),
    "unknown-input-name": lambda jpeg: wire.image_request(jpeg, "Placeholder:0"),
    "extra-input": lambda jpeg: _with_extra_input(wire.image_request(jpeg, INPUT), jpeg),
    "unknown-output-filter": lambda jpeg: wire.image_request(jpeg, INPUT, output_filter=["nope:0"]),
}


def _with_extra_input(request: lean.PredictRequest, jpeg: bytes) -> lean.PredictRequest:
    request.inputs["other"].CopyFrom(wire.string_input(jpeg))
    return request


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_malformed_requests_are_invalid_argument(
    guarded: StandinProcess, channels: dict[str, grpc.Channel], jpeg: bytes, case: str
) -> None:
    error = rpc_error(channel_to(channels, guarded), BAD_REQUESTS[case](jpeg), GOOD_METADATA)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details()


def test_the_server_keeps_answering_after_errors(
    guarded: StandinProcess, channels: dict[str, grpc.Channel], jpeg: bytes
) -> None:
    channel = channel_to(channels, guarded)
    for build in BAD_REQUESTS.values():
        with pytest.raises(grpc.RpcError):
            predict(channel, build(jpeg), GOOD_METADATA)
    assert scores(predict(channel, wire.image_request(jpeg, INPUT), GOOD_METADATA)).shape == (1000,)
    assert guarded.process.poll() is None


def test_output_filter_selects_the_output(
    guarded: StandinProcess, channels: dict[str, grpc.Channel], jpeg: bytes
) -> None:
    request = wire.image_request(jpeg, INPUT, output_filter=[RESNET50_OUTPUT])
    assert list(predict(channel_to(channels, guarded), request, GOOD_METADATA).outputs) == [RESNET50_OUTPUT]


def test_concurrent_calls_are_all_answered(
    guarded: StandinProcess, channels: dict[str, grpc.Channel], jpeg: bytes
) -> None:
    channel = channel_to(channels, guarded)
    images = [unique_jpeg(jpeg, f"concurrent-{i}") for i in range(24)]
    with futures.ThreadPoolExecutor(12) as pool:
        results = list(
            pool.map(lambda image: predict(channel, wire.image_request(image, INPUT), GOOD_METADATA), images)
        )
    for image, response in zip(images, results, strict=True):
        np.testing.assert_array_equal(scores(response), emulated_probabilities(image))


def read_stats(workdir: Path) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads((workdir / "stats.json").read_text())
    return stats


def test_stats_count_every_call_by_image_and_code(
    guarded: StandinProcess, channels: dict[str, grpc.Channel], jpeg: bytes, workdir: Path
) -> None:
    channel = channel_to(channels, guarded)
    image = unique_jpeg(jpeg, "stats")
    digest = hashlib.sha256(image).hexdigest()
    before = read_stats(workdir)
    predict(channel, wire.image_request(image, INPUT), GOOD_METADATA)
    predict(channel, wire.image_request(image, INPUT), GOOD_METADATA)
    rpc_error(channel, wire.image_request(image, INPUT), wire.call_metadata("bad", SERVICE))
    after = read_stats(workdir)
    assert after["by_sha256"][digest] == 3
    assert digest not in before["by_sha256"]
    assert after["predict_calls"] == before["predict_calls"] + 3
    assert after["ok_calls"] == before["ok_calls"] + 2
    assert after["by_code"]["UNAUTHENTICATED"] == before["by_code"].get("UNAUTHENTICATED", 0) + 1


def get_metadata(
    channel: grpc.Channel, metadata: wire.CallMetadata = (), fields: tuple[str, ...] = ("signature_def",)
) -> lean.GetModelMetadataResponse:
    request = lean.GetModelMetadataRequest(metadata_field=fields)
    request.model_spec.name = "anything"
    response: lean.GetModelMetadataResponse = wire.metadata_callable(channel)(
        request, timeout=TIMEOUT_S, metadata=metadata
    )
    return response


def test_metadata_describes_input_and_output_and_flags_emulation(
    guarded: StandinProcess, channels: dict[str, grpc.Channel]
) -> None:
    response = get_metadata(channel_to(channels, guarded), GOOD_METADATA)
    signature = wire.unpack_signature_def_map(response.metadata["signature_def"]).signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    assert signature.inputs[INPUT].dtype == lean.DT_STRING
    assert signature.inputs[INPUT].name == INPUT
    assert signature.outputs[RESNET50_OUTPUT].dtype == lean.DT_FLOAT
    assert [dim.size for dim in signature.outputs[RESNET50_OUTPUT].tensor_shape.dim] == [-1, 1000]
    assert response.model_spec.version.value == 1
    assert EMULATION_METADATA_FIELD in response.metadata
    assert "NOT REAL PREDICTIONS" in guarded.log()


def test_metadata_needs_auth_and_a_field(guarded: StandinProcess, channels: dict[str, grpc.Channel]) -> None:
    channel = channel_to(channels, guarded)
    with pytest.raises(grpc.RpcError) as unauthenticated:
        get_metadata(channel, wire.call_metadata("bad", SERVICE))
    assert unauthenticated.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as no_field:
        get_metadata(channel, GOOD_METADATA, fields=())
    assert no_field.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_health_service_reports_serving(guarded: StandinProcess, channels: dict[str, grpc.Channel]) -> None:
    stub = health_pb2_grpc.HealthStub(channel_to(channels, guarded))
    for service in ("", "tensorflow.serving.PredictionService"):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT_S)
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


def test_no_model_mode_never_loads_onnxruntime(guarded: StandinProcess) -> None:
    maps = Path(f"/proc/{guarded.process.pid}/maps").read_text()
    assert "libgrpc" in maps or "cygrpc" in maps  # the check does see the server's shared libraries
    assert "onnxruntime" not in maps
    assert "onnxruntime" not in guarded.log()


def test_the_key_never_shows_in_logs_or_the_command_line(guarded: StandinProcess) -> None:
    assert KEY not in guarded.log()
    assert KEY not in Path(f"/proc/{guarded.process.pid}/cmdline").read_bytes().decode(errors="replace")


# --------------------------------------------------------------------------------------------- official clients


def official_request(image: bytes, input_name: str) -> predict_pb2.PredictRequest:
    """What azureml.accel.PredictionClient.score_file sends, built with the official classes."""
    request = predict_pb2.PredictRequest()
    request.inputs[input_name].string_val.append(image)
    request.inputs[input_name].dtype = types_pb2.DT_STRING
    request.inputs[input_name].tensor_shape.dim.extend([tensor_shape_pb2.TensorShapeProto.Dim(size=1)])
    return request


def test_the_official_stub_and_classes_are_answered(guarded: StandinProcess, jpeg: bytes) -> None:
    with grpc.insecure_channel(guarded.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(official_request(jpeg, INPUT), TIMEOUT_S, metadata=GOOD_METADATA)
    array = tf.make_ndarray(response.outputs[RESNET50_OUTPUT])
    assert array.shape == (1, 1000)
    np.testing.assert_array_equal(array[0], emulated_probabilities(jpeg))


def _install_pkg_resources_shim() -> None:
    """azureml.accel imports pkg_resources (gone from setuptools >= 81) only for resource_string."""
    if "pkg_resources" in sys.modules:
        return
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        def resource_string(module: str, name: str) -> bytes:
            module_file = sys.modules[module].__file__
            assert module_file is not None
            return (Path(module_file).parent / name).read_bytes()

        shim.resource_string = resource_string  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim


@pytest.fixture(scope="module")
def azureml_client_class() -> type:
    """The real azureml.accel.PredictionClient (its import warns about deprecated azureml APIs)."""
    _install_pkg_resources_shim()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from azureml.accel import PredictionClient
    return PredictionClient  # type: ignore[no-any-return]


def write_photo(workdir: Path, name: str, data: bytes) -> str:
    path = workdir / name
    path.write_bytes(data)
    return str(path)


def test_azureml_prediction_client_score_file_is_answered(
    guarded: StandinProcess, azureml_client_class: type, jpeg: bytes, workdir: Path
) -> None:
    client = azureml_client_class(
        address="127.0.0.1", port=guarded.port, use_ssl=False, access_token=KEY, service_name=SERVICE
    )
    result = client.score_file(write_photo(workdir, "hopper.jpg", jpeg), input_name=INPUT, outputs=RESNET50_OUTPUT)
    assert result.shape == (1000,)
    np.testing.assert_array_equal(result, emulated_probabilities(jpeg))


# --------------------------------------------------------------------------------------------- other servers


def test_any_single_input_and_overridden_output_name(
    open_vgg: StandinProcess, channels: dict[str, grpc.Channel], jpeg: bytes
) -> None:
    channel = channel_to(channels, open_vgg)
    for input_name in ("Placeholder:0", "images", "whatever"):
        response = predict(channel, wire.image_request(jpeg, input_name))
        assert list(response.outputs) == ["edge/vgg16:0"]
    logits = scores(response, "edge/vgg16:0")
    assert (logits < 0).all()  # logits, not probabilities
    assert int(np.argmax(softmax(logits))) == int(np.argmax(emulated_probabilities(jpeg)))
    error = rpc_error(channel, _with_extra_input(wire.image_request(jpeg, "a"), jpeg))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_tls(tls_server: tuple[StandinProcess, bytes], jpeg: bytes) -> None:
    standin, cert = tls_server
    credentials = grpc.ssl_channel_credentials(root_certificates=cert)
    with grpc.secure_channel(standin.address, credentials) as channel:
        response = predict(channel, wire.image_request(jpeg, INPUT))
    np.testing.assert_array_equal(scores(response), emulated_probabilities(jpeg))
    with grpc.insecure_channel(standin.address) as plain:
        error = rpc_error(plain, wire.image_request(jpeg, INPUT))
    assert error.code() is grpc.StatusCode.UNAVAILABLE


def test_ssd_replay_returns_the_twelve_tensors(
    ssd_server: StandinProcess, channels: dict[str, grpc.Channel], jpeg: bytes
) -> None:
    channel = channel_to(channels, ssd_server)
    response = predict(channel, wire.image_request(jpeg, "Placeholder:0"))
    expected = ssd_replay_arrays()
    assert set(response.outputs) == set(PROFILES["ssd_vgg"].outputs) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(wire.tensor_to_ndarray(response.outputs[name]), array)
    error = rpc_error(channel, wire.image_request(jpeg[:-100], "Placeholder:0"))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    metadata = get_metadata(channel)
    signature = wire.unpack_signature_def_map(metadata.metadata["signature_def"]).signature_def["serving_default"]
    shape = [dim.size for dim in signature.outputs[ssd_logits_name("block4")].tensor_shape.dim]
    assert shape == [-1, 37, 37, 4, 21]
    assert EMULATION_METADATA_FIELD in metadata.metadata


def run_cli(*args: str) -> tuple[int, str]:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "deploy.standin", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stderr


def test_ssd_needs_a_valid_replay_file(workdir: Path) -> None:
    code, stderr = run_cli("--model", "ssd_vgg")
    assert code == 2
    assert "--replay" in stderr
    bad = workdir / "bad_replay.npz"
    arrays = ssd_replay_arrays()
    arrays[ssd_logits_name("block7")] = arrays[ssd_logits_name("block7")][0]
    np.savez(bad, **arrays)  # type: ignore[arg-type]
    code, stderr = run_cli("--model", "ssd_vgg", "--replay", str(bad))
    assert code == 2
    assert "block7" in stderr


def test_injected_failures_and_delay(failing: StandinProcess, channels: dict[str, grpc.Channel], jpeg: bytes) -> None:
    started = time.monotonic()
    error = rpc_error(channel_to(channels, failing), wire.image_request(jpeg, INPUT))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - started >= 0.3


def test_a_hung_call_ends_at_the_deadline_and_shutdown_is_prompt(workdir: Path, jpeg: bytes) -> None:
    standin = start_standin(["--no-model", "--hang-rate", "1"], workdir / "hanging.log")
    try:
        with grpc.insecure_channel(standin.address) as channel:
            call = wire.predict_callable(channel)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as deadline:
                call(wire.image_request(jpeg, INPUT), timeout=0.5)
            assert deadline.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 5
            errors: list[grpc.RpcError] = []
            no_deadline = threading.Thread(target=lambda: _collect_error(call, jpeg, errors))
            no_deadline.start()
            time.sleep(0.5)
            stopped = time.monotonic()
            assert standin.stop() == 0
            no_deadline.join(10)
            assert time.monotonic() - stopped < 8
            assert [error.code() for error in errors] in (
                [grpc.StatusCode.UNAVAILABLE],
                [grpc.StatusCode.CANCELLED],
            )
    finally:
        standin.stop()


def _collect_error(call: grpc.UnaryUnaryMultiCallable, jpeg: bytes, errors: list[grpc.RpcError]) -> None:
    try:
        call(wire.image_request(jpeg, INPUT))
    except grpc.RpcError as exc:
        errors.append(exc)


# --------------------------------------------------------------------------------------------- the real model


@pytest.mark.model
def test_real_model_finds_the_cat_and_the_espresso(
    real_resnet50: StandinProcess, channels: dict[str, grpc.Channel], chelsea: bytes, coffee: bytes
) -> None:
    channel = channel_to(channels, real_resnet50)
    cat = scores(predict(channel, wire.image_request(chelsea, INPUT)))
    espresso = scores(predict(channel, wire.image_request(coffee, INPUT)))
    assert CAT_CLASSES & set(np.argsort(cat)[::-1][:5].tolist())
    assert ESPRESSO in np.argsort(espresso)[::-1][:5].tolist()
    for probabilities in (cat, espresso):
        assert abs(float(probabilities.sum()) - 1.0) < 1e-4
        assert (probabilities >= 0).all()
    metadata = get_metadata(channel)
    assert EMULATION_METADATA_FIELD not in metadata.metadata
    assert "onnxruntime" in Path(f"/proc/{real_resnet50.process.pid}/maps").read_text()


@pytest.mark.model
def test_real_model_rejects_undecodable_images(
    real_resnet50: StandinProcess, channels: dict[str, grpc.Channel], chelsea: bytes
) -> None:
    channel = channel_to(channels, real_resnet50)
    for data in (b"\x00garbage" * 100, chelsea[: len(chelsea) // 2]):
        assert rpc_error(channel, wire.image_request(data, INPUT)).code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.model
def test_azureml_client_gets_a_real_prediction(
    real_resnet50: StandinProcess, azureml_client_class: type, chelsea: bytes, workdir: Path
) -> None:
    client = azureml_client_class(address="127.0.0.1", port=real_resnet50.port, use_ssl=False)
    result = client.score_file(write_photo(workdir, "chelsea.jpg", chelsea), input_name=INPUT, outputs=RESNET50_OUTPUT)
    assert result.shape == (1000,)
    assert CAT_CLASSES & set(np.argsort(result)[::-1][:5].tolist())


@pytest.mark.model
def test_vgg16_profile_returns_logits_with_the_same_top1(
    real_resnet50: StandinProcess,
    real_vgg16: StandinProcess,
    channels: dict[str, grpc.Channel],
    chelsea: bytes,
    coffee: bytes,
) -> None:
    for image in (chelsea, coffee):
        probabilities = scores(predict(channel_to(channels, real_resnet50), wire.image_request(image, INPUT)))
        logits = scores(predict(channel_to(channels, real_vgg16), wire.image_request(image, "x")), VGG16_OUTPUT)
        assert abs(float(logits.sum()) - 1.0) > 1e-2 or (logits < 0).any()  # not a distribution
        assert int(np.argmax(softmax(logits))) == int(np.argmax(probabilities))
        np.testing.assert_allclose(softmax(logits), probabilities, atol=1e-5)
