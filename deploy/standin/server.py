"""The stand-in gRPC scoring server: TF-Serving Predict/GetModelMetadata as the Azure FPGA service answers."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from deploy.standin.faults import FaultInjector, FaultKind, FaultPlan
from deploy.standin.profiles import OutputSource, UnreadableImageError, output_shapes
from worker import wire
from worker.models.catalog import DEFAULT_INPUT_NAME, ModelProfile
from worker.protos.tf_serving_pb2 import (
    DT_FLOAT,
    DT_STRING,
    DataType,
    GetModelMetadataRequest,
    GetModelMetadataResponse,
    PredictRequest,
    PredictResponse,
    SignatureDef,
    SignatureDefMap,
    TensorInfo,
)

logger = logging.getLogger(__name__)

MODEL_VERSION = 1
# Present in GetModelMetadata only when the answers are not real predictions (emulation, SSD replay).
EMULATION_METADATA_FIELD = "blobscore_emulation"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# How long an unanswered hung call may hold a worker thread when the client set no deadline.
_MAX_HANG_S = 3600.0


class RequestError(Exception):
    """A call the service refuses, with the gRPC status code and message to answer it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        """Refuse with `code` and `message`."""
        super().__init__(message)
        self.code = code
        self.message = message


class ServerStartError(Exception):
    """The server could not start (port taken, unreadable TLS files)."""


@dataclass(frozen=True)
class StandinConfig:
    """What the service checks and serves; `None` turns the corresponding check off."""

    profile: ModelProfile
    input_name: str | None = None
    key: str | None = field(default=None, repr=False)
    service_name: str | None = None
    faults: FaultPlan = field(default_factory=FaultPlan)
    fault_seed: int | None = None
    stats_file: Path | None = None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the server certificate (chain) and its private key."""

    cert: Path
    key: Path


def check_call_metadata(metadata: Iterable[tuple[str, str | bytes]], key: str | None, service_name: str | None) -> None:
    """Authorize a call as the Azure gateway does: key first (UNAUTHENTICATED), then route (NOT_FOUND)."""
    headers: dict[str, str | bytes] = {}
    for name, value in metadata:
        headers.setdefault(name.lower(), value)
    if key is not None and not _same(headers.get(wire.AUTHORIZATION_HEADER), wire.bearer(key)):
        raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid authorization key")
    if service_name is not None:
        route = headers.get(wire.SERVICE_ROUTE_HEADER)
        if not _same(route, wire.service_route(service_name)):
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no service at route {_text(route)!r}")


def _same(received: str | bytes | None, expected: str) -> bool:
    """Constant-time comparison, so response timing does not reveal how much of a key was right."""
    if received is None:
        return False
    raw = received if isinstance(received, bytes) else received.encode()
    return hmac.compare_digest(raw, expected.encode())


def _text(value: str | bytes | None) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value or ""


def extract_image(request: PredictRequest, input_name: str | None) -> bytes:
    """The encoded image of a request: one DT_STRING tensor of shape [1]; INVALID_ARGUMENT otherwise."""
    tensor = request.inputs.get(_input_alias(request, input_name))
    if tensor is None:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"missing input {input_name!r}")
    if tensor.dtype != DT_STRING:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"expects the input to be DT_STRING but dtype {tensor.dtype} is provided"
        )
    shape = [dim.size for dim in tensor.tensor_shape.dim]
    if shape != [1]:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input shape must be [1] (batch size 1), got {shape}")
    if len(tensor.string_val) != 1:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"shape [1] needs 1 string value, got {len(tensor.string_val)}"
        )
    return tensor.string_val[0]


def _input_alias(request: PredictRequest, input_name: str | None) -> str:
    aliases = list(request.inputs)
    if input_name is None:
        # No configured name: any single input is the image.
        if len(aliases) != 1:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"expected exactly 1 input, got {len(aliases)}")
        return aliases[0]
    unknown = sorted(set(aliases) - {input_name})
    if unknown:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input tensor alias not found in signature: {', '.join(unknown)}; expected {{{input_name}}}",
        )
    return input_name


def select_outputs(profile: ModelProfile, output_filter: Sequence[str]) -> tuple[str, ...]:
    """The outputs to return: all, or those in the filter (unknown names are INVALID_ARGUMENT)."""
    if not output_filter:
        return profile.outputs
    unknown = [name for name in output_filter if name not in profile.outputs]
    if unknown:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"output tensor alias not found in signature: {', '.join(unknown)}"
        )
    return tuple(dict.fromkeys(output_filter))


def signature_def_map(profile: ModelProfile, input_name: str | None) -> SignatureDefMap:
    """The serving_default signature: one string image input and the profile's float outputs, batch -1."""
    signature = SignatureDef(method_name=wire.PREDICT_METHOD_NAME)
    name = input_name or DEFAULT_INPUT_NAME
    _describe(signature.inputs[name], name, DT_STRING, (-1,))
    for output, shape in output_shapes(profile).items():
        _describe(signature.outputs[output], output, DT_FLOAT, (-1, *shape[1:]))
    signatures = SignatureDefMap()
    signatures.signature_def[wire.DEFAULT_SIGNATURE].CopyFrom(signature)
    return signatures


def _describe(info: TensorInfo, name: str, dtype: DataType, shape: tuple[int, ...]) -> None:
    info.name = name
    info.dtype = dtype
    for size in shape:
        info.tensor_shape.dim.add(size=size)


class CallStats:
    """Predict call accounting for tests, rewritten atomically to a JSON file after every call."""

    def __init__(self, path: Path | None) -> None:
        """Account into `path`; with None, accounting is off."""
        self._path = path
        self._lock = threading.Lock()
        self._calls = 0
        self._by_sha256: Counter[str] = Counter()
        self._by_code: Counter[str] = Counter()
        if path is not None:
            self._write()

    @property
    def enabled(self) -> bool:
        """True when calls are being accounted."""
        return self._path is not None

    def record(self, image: bytes | None, code: grpc.StatusCode) -> None:
        """Count one finished call, its image (if the request carried one) and its status code."""
        if self._path is None:
            return
        digest = hashlib.sha256(image).hexdigest() if image is not None else None
        with self._lock:
            self._calls += 1
            self._by_code[code.name] += 1
            if digest is not None:
                self._by_sha256[digest] += 1
            self._write()

    def _write(self) -> None:
        assert self._path is not None
        payload = {
            "predict_calls": self._calls,
            "ok_calls": self._by_code["OK"],
            "by_sha256": dict(self._by_sha256),
            "by_code": dict(self._by_code),
        }
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=self._path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle)
        os.replace(tmp, self._path)


def _carried_image(request: PredictRequest) -> bytes | None:
    """The first string value of any input: the image of a refused call, for accounting only."""
    for tensor in request.inputs.values():
        if tensor.string_val:
            return tensor.string_val[0]
    return None


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("grpc's abort returned")  # abort always raises; this keeps the type checker honest


class ScoringService:
    """Predict and GetModelMetadata of one model profile."""

    def __init__(self, config: StandinConfig, source: OutputSource, stopping: threading.Event) -> None:
        """Serve `config.profile` from `source`; `stopping` releases hung calls at shutdown."""
        self._config = config
        self._source = source
        self._stopping = stopping
        self._faults = FaultInjector(config.faults, config.fault_seed)
        self._stats = CallStats(config.stats_file)
        self._metadata = self._metadata_response()

    def predict(self, request: PredictRequest, context: grpc.ServicerContext) -> PredictResponse:
        """Score the request's one image; every refusal is a gRPC status, never a crash."""
        image: bytes | None = None
        code = grpc.StatusCode.INTERNAL
        try:
            check_call_metadata(context.invocation_metadata(), self._config.key, self._config.service_name)
            image = extract_image(request, self._config.input_name)
            response = self._score(request, image, context)
            code = grpc.StatusCode.OK
            return response
        except RequestError as exc:
            code = exc.code
            _abort(context, exc.code, exc.message)
        except Exception:
            logger.exception("Predict failed")
            _abort(context, grpc.StatusCode.INTERNAL, "internal error in the stand-in scoring service")
        finally:
            if self._stats.enabled:
                self._stats.record(image if image is not None else _carried_image(request), code)

    def _score(self, request: PredictRequest, image: bytes, context: grpc.ServicerContext) -> PredictResponse:
        names = select_outputs(self._config.profile, request.output_filter)
        self._inject_faults(context)
        try:
            tensors = self._source.outputs(image)
        except UnreadableImageError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot decode the image: {exc}") from exc
        response = PredictResponse()
        response.model_spec.CopyFrom(self._metadata.model_spec)
        for name in names:
            response.outputs[name].CopyFrom(wire.ndarray_to_tensor(tensors[name]))
        return response

    def _inject_faults(self, context: grpc.ServicerContext) -> None:
        decision = self._faults.next_decision()
        if decision.delay_s > 0 and self._stopping.wait(decision.delay_s):
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if decision.kind is FaultKind.HANG:
            self._hang(context)
        if decision.kind is FaultKind.FAIL:
            code = self._config.faults.fail_code
            raise RequestError(code, f"injected fault (--fail-rate, --fail-code {code.name})")

    def _hang(self, context: grpc.ServicerContext) -> NoReturn:
        """Never answer: wait until the client gives up (deadline, cancel) or the server stops."""
        finished = threading.Event()
        if context.add_callback(finished.set):
            remaining = context.time_remaining()
            limit = _MAX_HANG_S if remaining is None else min(remaining + 1.0, _MAX_HANG_S)
            # Polled in short steps because two events (call over, server stopping) can end the wait.
            waited = 0.0
            while waited < limit and not self._stopping.is_set() and not finished.wait(0.1):
                waited += 0.1
        raise RequestError(grpc.StatusCode.CANCELLED, "injected hang (--hang-rate) ended")

    def get_model_metadata(
        self, request: GetModelMetadataRequest, context: grpc.ServicerContext
    ) -> GetModelMetadataResponse:
        """The serving_default signature, as TF Serving returns it for metadata_field 'signature_def'."""
        try:
            check_call_metadata(context.invocation_metadata(), self._config.key, self._config.service_name)
            _check_metadata_fields(request.metadata_field)
        except RequestError as exc:
            _abort(context, exc.code, exc.message)
        return self._metadata

    def _metadata_response(self) -> GetModelMetadataResponse:
        response = GetModelMetadataResponse()
        response.model_spec.name = self._config.profile.name
        response.model_spec.version.value = MODEL_VERSION
        response.model_spec.signature_name = wire.DEFAULT_SIGNATURE
        signatures = signature_def_map(self._config.profile, self._config.input_name)
        response.metadata[wire.SIGNATURE_DEF_METADATA_FIELD].CopyFrom(wire.pack_signature_def_map(signatures))
        if self._source.emulated:
            note = wrappers_pb2.StringValue(value="EMULATED: these outputs are not real model predictions")
            response.metadata[EMULATION_METADATA_FIELD].Pack(note)
        return response


def _check_metadata_fields(fields: Sequence[str]) -> None:
    if not fields:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field"
        )
    unsupported = [name for name in fields if name != wire.SIGNATURE_DEF_METADATA_FIELD]
    if unsupported:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"metadata field {', '.join(unsupported)} is not supported"
        )


@dataclass
class RunningServer:
    """A started server: its bound port and how to stop it."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    stopping: threading.Event

    def stop(self, grace_s: float = 2.0) -> None:
        """Report NOT_SERVING, release hung calls, finish in-flight calls within `grace_s`, then stop."""
        self.health.enter_graceful_shutdown()
        self.stopping.set()
        self.server.stop(grace_s).wait()


def start_server(
    config: StandinConfig,
    source: OutputSource,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: TlsFiles | None = None,
    workers: int = 8,
) -> RunningServer:
    """Start serving on host:port (0 picks a free port), with TLS when `tls` is given."""
    stopping = threading.Event()
    service = ScoringService(config, source, stopping)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="standin"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Linux gRPC sets SO_REUSEPORT by default: a second server on a busy port would bind silently.
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((wire.prediction_service_handler(service.predict, service.get_model_metadata),))
    health_servicer = _add_health(server)
    bound = _bind(server, f"{_host_for_address(host)}:{port}", tls)
    server.start()
    return RunningServer(server, bound, health_servicer, stopping)


def _add_health(server: grpc.Server) -> health.HealthServicer:
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for service_name in ("", wire.SERVICE_NAME):
        servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def _bind(server: grpc.Server, address: str, tls: TlsFiles | None) -> int:
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())])
            bound = server.add_secure_port(address, credentials)
    except OSError as exc:
        raise ServerStartError(f"cannot read the TLS files: {exc}") from exc
    except RuntimeError as exc:
        raise ServerStartError(f"cannot listen on {address}: {exc}") from exc
    if not bound:
        raise ServerStartError(f"cannot listen on {address}")
    return int(bound)


def _host_for_address(host: str) -> str:
    """IPv6 literals need brackets in a host:port address."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
