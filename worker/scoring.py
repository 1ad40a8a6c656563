"""Scoring adapter: one image per TF-Serving Predict call over one shared gRPC channel; status codes become ours."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt

from worker import wire
from worker.errors import ConfigurationError, PermanentError, RejectionCode, TransientError
from worker.models.catalog import ModelProfile
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


def error_for_status(code: grpc.StatusCode, details: str) -> Exception:
    """Our error for a gRPC status: transient (retry), configuration (fix settings) or permanent (reject)."""
    if code in OUTAGE_CODES:
        return ScoringUnavailableError(f"scoring service {code.name}: {details}")
    if code in TRANSIENT_CODES:
        return TransientError(f"scoring service {code.name}: {details}")
    if code in CONFIGURATION_CODES:
        return ConfigurationError(f"scoring service {code.name}: {details}")
    return PermanentError(RejectionCode.SCORER_REJECTED, f"scoring service {code.name}: {details}")


def open_channel(settings: Settings) -> grpc.Channel:
    """A channel to the configured service, TLS when asked; create it per process, after any fork."""
    target = f"{settings.scoring_address}:{settings.scoring_port}"
    options = [
        ("grpc.max_send_message_length", settings.max_image_bytes + 1024 * 1024),
        ("grpc.max_receive_message_length", _RESPONSE_LIMIT),
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    if not settings.scoring_tls:
        return grpc.insecure_channel(target, options=options)
    root = Path(settings.scoring_ca_file).read_bytes() if settings.scoring_ca_file else None
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root), options=options)


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
    ) -> None:
        self._channel = channel
        self._predict = wire.predict_callable(channel)
        self._profile = profile
        self._input_name = input_name
        self._metadata = metadata
        self._timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings: Settings, profile: ModelProfile) -> Scorer:
        """A scorer for the configured service, over a new channel."""
        key = settings.scoring_key.get_secret_value() if settings.scoring_key else None
        return cls(
            open_channel(settings),
            profile,
            input_name=settings.scoring_input_name,
            metadata=wire.call_metadata(key, settings.scoring_service_name),
            timeout_s=settings.scoring_timeout_s,
        )

    def predict(self, image: bytes) -> dict[str, npt.NDArray[np.float32]]:
        """The profile's output tensors for one image (batch dimension kept), in one request under the deadline."""
        request = wire.image_request(image, self._input_name)
        try:
            response = self._predict(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_for_status(exc.code(), exc.details() or "") from exc
        # No output_filter: the FPGA service returns its fixed outputs and its sample client never sends one.
        try:
            return {name: wire.tensor_to_ndarray(response.outputs[name]) for name in self._profile.outputs
                    if name in response.outputs}
        except ValueError as exc:
            raise PermanentError(RejectionCode.BAD_MODEL_OUTPUT, str(exc)) from exc

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()
