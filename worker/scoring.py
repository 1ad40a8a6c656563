"""Scoring adapter: one image per TF-Serving Predict call over one shared gRPC channel; status codes become ours."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt

from worker import metrics, wire
from worker.errors import ConfigurationError, PermanentError, RejectionCode, TransientError
from worker.models.catalog import ModelProfile, get_profile
from worker.protos.tf_serving_pb2 import GetModelMetadataRequest
from worker.services import ServiceConfig, setting_for
from worker.settings import Settings

# Outage-like statuses: they feed the circuit breaker as well as the retry policy.
OUTAGE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # the FPGA service's throttling
})
TRANSIENT_CODES = frozenset({
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
})
CONFIGURATION_CODES = frozenset({
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.FAILED_PRECONDITION,
})
# gRPC itself retries only UNAVAILABLE, a few times, quickly: the task-level policy handles the rest, so the two
# never multiply into a storm. The per-call deadline still bounds every attempt together.
_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "tensorflow.serving.PredictionService"}],
        "retryPolicy": {
            "maxAttempts": 3,
            "initialBackoff": "0.1s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
})
_RESPONSE_LIMIT = 64 * 1024 * 1024


class ScoringUnavailableError(TransientError):
    """The scoring service is down, overloaded or too slow: retry later, and count it for the circuit breaker."""


class ScoringConfigurationError(ConfigurationError):
    """The service refuses our key or route, or does not speak the protocol: the settings need fixing."""

    def __init__(self, service: str, code: str, message: str) -> None:
        super().__init__(message)
        self.service = service
        self.code = code


def configuration_message(service: ServiceConfig, code: grpc.StatusCode, details: str) -> str:
    """What went wrong with a service's settings, and which setting to check (never the key itself)."""
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        problem, setting = "rejects the key", setting_for(service, "key")
    elif code is grpc.StatusCode.NOT_FOUND:
        problem, setting = f"does not know the route {service.route!r}", setting_for(service, "route")
    elif code is grpc.StatusCode.UNIMPLEMENTED:
        problem, setting = "does not serve TF Serving's PredictionService", setting_for(service, "address")
    else:
        problem, setting = "refuses the request", f"{setting_for(service, 'key')} and {setting_for(service, 'route')}"
    return f"scoring service {service.name} at {service.target} {problem} ({code.name}: {details}) — check {setting}"


def error_for_status(code: grpc.StatusCode, details: str, service: ServiceConfig | None = None) -> Exception:
    """Our error for a gRPC status: transient (retry), configuration (fix settings) or permanent (reject)."""
    metrics.count_grpc_error(service.name if service else None, code.name)
    if code in OUTAGE_CODES:
        return ScoringUnavailableError(f"scoring service {code.name}: {details}")
    if code in TRANSIENT_CODES:
        return TransientError(f"scoring service {code.name}: {details}")
    if code in CONFIGURATION_CODES:
        if service is None:
            return ConfigurationError(f"scoring service {code.name}: {details}")
        return ScoringConfigurationError(service.name, code.name, configuration_message(service, code, details))
    return PermanentError(RejectionCode.SCORER_REJECTED, f"scoring service {code.name}: {details}")


def open_channel(service: ServiceConfig, max_image_bytes: int) -> grpc.Channel:
    """A channel to `service`, TLS when asked; create it per process, after any fork."""
    options = [
        ("grpc.max_send_message_length", max_image_bytes + 1024 * 1024),
        ("grpc.max_receive_message_length", _RESPONSE_LIMIT),
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    if not service.tls:
        return grpc.insecure_channel(service.target, options=options)
    root = Path(service.ca_file).read_bytes() if service.ca_file else None
    return grpc.secure_channel(service.target, grpc.ssl_channel_credentials(root_certificates=root), options=options)


def profile_of(service: ServiceConfig) -> ModelProfile:
    """The model profile a service runs, with its output-name overrides."""
    return get_profile(service.model).with_outputs(tuple(service.output_names) or None)


class Scorer:
    """Scores one image per Predict call; thread-safe, shares its channel across threads."""

    def __init__(
        self,
        channel: grpc.Channel,
        profile: ModelProfile,
        *,
        input_name: str,
        metadata: tuple[tuple[str, str], ...],
        timeout_s: float,
        service: ServiceConfig | None = None,
    ) -> None:
        self._service = service
        self._channel = channel
        # Requests go out already serialized: the image is copied once on our side, not twice (worker/wire.py).
        self._predict = wire.predict_bytes_callable(channel)
        self._profile = profile
        self._input_name = input_name
        self._metadata = metadata
        self._timeout_s = timeout_s

    @classmethod
    def for_service(cls, service: ServiceConfig, settings: Settings) -> Scorer:
        """A scorer for `service`, over a new channel; deadline and message size from the settings."""
        key = service.key.get_secret_value() if service.key else None
        return cls(
            open_channel(service, settings.max_image_bytes),
            profile_of(service),
            input_name=service.input_name,
            metadata=wire.call_metadata(key, service.route),
            timeout_s=settings.scoring_timeout_s,
            service=service,
        )

    @property
    def profile(self) -> ModelProfile:
        """The model profile this scorer's service runs."""
        return self._profile

    def predict(self, image: bytes) -> dict[str, npt.NDArray[np.float32]]:
        """The profile's output tensors for one image (batch dimension kept), in one request under the deadline."""
        request = wire.encoded_image_request(image, self._input_name)
        try:
            response = self._predict(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_for_status(exc.code(), exc.details() or "", self._service) from exc
        # No output_filter: the FPGA service returns its fixed outputs and its sample client never sends one.
        try:
            return {name: wire.tensor_to_ndarray(response.outputs[name]) for name in self._profile.outputs
                    if name in response.outputs}
        except ValueError as exc:
            raise PermanentError(RejectionCode.BAD_MODEL_OUTPUT, str(exc)) from exc

    def check(self) -> str:
        """Reach the service with the key and route (GetModelMetadata, else gRPC health); our error if it fails."""
        request = GetModelMetadataRequest(metadata_field=[wire.SIGNATURE_DEF_METADATA_FIELD])
        try:
            wire.metadata_callable(self._channel)(request, timeout=self._timeout_s, metadata=self._metadata)
            return "model metadata answered"
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                raise error_for_status(exc.code(), exc.details() or "", self._service) from exc
        return self._check_health()

    def _check_health(self) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_for_status(exc.code(), exc.details() or "", self._service) from exc
        return f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()
