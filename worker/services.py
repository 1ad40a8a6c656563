"""The services registry: each scoring service's region, address, TLS, key variable and model (never the key)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from worker.models.catalog import DEFAULT_INPUT_NAME


class ServiceConfig(BaseModel):
    """How to reach one scoring service and what it runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    region: str = "local"
    address: str
    port: int = Field(default=443, ge=1, le=65535)
    tls: bool = False
    ca_file: Path | None = None
    # The name of the environment variable (or mounted secret's variable) holding the key, never the key.
    key_env: str | None = None
    # Resolved from key_env at the entry point; excluded from every dump.
    key: SecretStr | None = Field(default=None, exclude=True)
    # The Azure ML web service name sent in the route header; none for TF Serving or OpenVINO.
    route: str | None = None
    model: str = "resnet50"
    input_name: str = DEFAULT_INPUT_NAME
    output_names: list[str] = Field(default_factory=list)
    # False for the default service built from the flat BLOBSCORE_SCORING_* settings: error hints name those.
    from_registry: bool = Field(default=True, exclude=True)

    @property
    def target(self) -> str:
        """`host:port` for gRPC."""
        return f"{self.address}:{self.port}"

    def describe(self) -> dict[str, object]:
        """A printable view: everything but the key, and whether a key was found."""
        return {**self.model_dump(mode="json"), "key_set": self.key is not None}


def setting_for(service: ServiceConfig, what: str) -> str:
    """Where the user sets a service's `key`, `route` or `address`: the setting an error message tells them to check."""
    if not service.from_registry:
        flat = {"key": "BLOBSCORE_SCORING_KEY", "route": "BLOBSCORE_SCORING_SERVICE_NAME",
                "address": "BLOBSCORE_SCORING_ADDRESS/_PORT"}
        return flat[what]
    if what == "key":
        return service.key_env or f"key_env of [services.{service.name}]"
    return f"{'route' if what == 'route' else 'address/port'} of [services.{service.name}]"


def queue_name(base: str, namespace: str, service: str) -> str:
    """The queue a service's tasks of one deployment go to: that deployment's workers in the region consume it."""
    return f"{base}.{namespace}.{service}"


def services_in_region(services: dict[str, ServiceConfig], region: str) -> list[str]:
    """The names of the services of one region."""
    return sorted(name for name, service in services.items() if service.region == region)
