"""The one Settings object: BLOBSCORE_* environment variables over a config file over the local stack's file."""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from worker.deployment import (
    AccountRef,
    Deployment,
    account_from_connection_string,
    account_from_url,
    check_namespace,
    derive_namespace,
)
from worker.errors import ConfigurationError
from worker.models.catalog import DEFAULT_INPUT_NAME
from worker.services import ServiceConfig, queue_name

STACK_FILE = Path(".blobscore") / "stack.json"
CONFIG_FILE = Path("blobscore.toml")
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
# The tables a config file may have; anything else is a typo that would silently fall back to a default.
CONFIG_TABLES = frozenset({"blobscore", "services", "schedules"})
# Never echoed in an error message.
SECRET_SETTINGS = frozenset({"blob_connection_string", "scoring_key", "services"})
MiB = 1024 * 1024


class Settings(BaseSettings):
    """Everything blobscore can be told; built once at the entry point and passed down."""

    model_config = SettingsConfigDict(env_prefix="BLOBSCORE_", extra="ignore", frozen=True)

    # Broker and job records.
    broker_url: str = DEFAULT_BROKER_URL
    jobs_redis_url: str | None = Field(default=None, description="Redis for job records; the broker's by default")
    queue: str = "blobscore"
    # This deployment's part of every queue name and Redis key, so deployments sharing one Redis never see each
    # other's tasks, jobs, schedules or breakers. Unset: derived from the storage account (worker/deployment.py).
    namespace: str | None = None

    # Blob Storage: a connection string, or an account URL with an azure-identity credential.
    blob_connection_string: SecretStr | None = None
    blob_account_url: str | None = None
    # Honour HTTP(S)_PROXY and ~/.netrc for Blob Storage (off: requests would look them up on every call).
    blob_use_env_proxies: bool = False

    # Named scoring services (the config file's [services.NAME] tables); see worker/services.py.
    services: dict[str, ServiceConfig] = Field(default_factory=dict)
    # The default service, also usable without a registry through the flat scoring_* settings below (Azure ML
    # FPGA service, TF Serving, OpenVINO Model Server or the local stand-in).
    service: str = "local"
    scoring_region: str = "local"
    scoring_address: str = "127.0.0.1"
    scoring_port: int = Field(default=8500, ge=1, le=65535)
    scoring_tls: bool = False
    scoring_ca_file: Path | None = None
    scoring_key: SecretStr | None = None
    scoring_service_name: str | None = None
    scoring_model: str = "resnet50"
    scoring_input_name: str = DEFAULT_INPUT_NAME
    scoring_output_names: list[str] = Field(default_factory=list)
    scoring_timeout_s: float = Field(default=10.0, gt=0)

    # Results.
    results_container: str | None = None
    results_prefix: str | None = None
    top_k: int = Field(default=5, ge=1)
    # SSD-VGG: an (anchor, class) pair above this softmax score is a candidate detection.
    detection_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)

    # Input limits, checked before anything is decoded.
    max_image_bytes: int = Field(default=16 * MiB, ge=1)
    max_image_pixels: int = Field(default=80_000_000, ge=1)
    # How a downloaded image is checked before it is sent: "structure" reads the JPEG's markers and frame header
    # (no decode: the scoring service decodes the JPEG itself and answers INVALID_ARGUMENT for one it cannot);
    # "decode" also decodes the whole entropy-coded stream, for services that do not check for themselves.
    image_check: Literal["structure", "decode"] = "structure"
    # Off by default: send the original bytes. When set (e.g. 448), photos whose short side is over twice this
    # are sent as a JPEG copy with this short side (EXIF orientation applied), recorded in the result.
    shrink_short_side: int | None = Field(default=None, ge=32)

    # Producer: most of one job's tasks waiting in the broker at once (~1.2 KB a message: ~50 MB).
    enqueue_window: int = Field(default=40_000, ge=1)

    # Worker.
    worker_concurrency: int = Field(default=16, ge=1)
    max_transient_retries: int = Field(default=30, ge=0)
    retry_backoff_max_s: float = Field(default=60.0, gt=0)
    # Unacked messages come back after this long; must exceed a task's run plus the longest retry countdown.
    visibility_timeout_s: int = Field(default=240, ge=1)
    # Starts of one image that never finished (worker killed or hung) before it is rejected as a poison pill.
    max_crash_attempts: int = Field(default=3, ge=1)
    breaker_failure_threshold: int = Field(default=10, ge=1)
    breaker_open_s: float = Field(default=10.0, gt=0)
    soft_shutdown_timeout_s: float = Field(default=10.0, ge=0)
    # The longest one task may run: its download, Predict and upload calls each have a deadline well below it.
    task_time_limit_s: float = Field(default=90.0, gt=0)
    # Celery's remote control (`celery inspect`, Flower's worker view). On: its pub/sub connection is what makes the
    # consumer notice a Redis restart — without it, a 3 s outage left a worker waiting forever on a dead
    # connection (fault scenario 5). It was also blamed for kombu stopping a worker now and then across restarts
    # ("'NoneType' object has no attribute 'hostname'"); 20 restarts in a row under 2 workers saw none.
    worker_remote_control: bool = True
    # Celery task events, for Flower's task views: about 1 ms of worker CPU per image. Off unless you watch tasks.
    worker_task_events: bool = False
    # Prometheus metrics of each worker process at http://<metrics_host>:<metrics_port>/metrics (worker/metrics.py);
    # off when unset. One port per process: give each process on one host its own.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "0.0.0.0"
    # Log lines (worker/logs.py): readable text, or one JSON object per line for a log shipper; and from which level.
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def service_config(self, name: str | None = None) -> ServiceConfig:
        """The named service (default: `service`), from the registry or, for the default, the scoring_* fields."""
        name = name or self.service
        if name in self.services:
            return self.services[name]
        if name != self.service:
            known = ", ".join(sorted({*self.services, self.service}))
            raise ConfigurationError(f"unknown service {name!r}; known: {known}")
        return ServiceConfig(
            name=name, region=self.scoring_region, address=self.scoring_address, port=self.scoring_port,
            tls=self.scoring_tls, ca_file=self.scoring_ca_file, key=self.scoring_key,
            route=self.scoring_service_name, model=self.scoring_model, input_name=self.scoring_input_name,
            output_names=self.scoring_output_names, from_registry=False,
        )

    def all_services(self) -> dict[str, ServiceConfig]:
        """Every known service by name: the registry plus the default one."""
        return {self.service: self.service_config(), **self.services}

    def queue_for(self, service: str) -> str:
        """The queue of a service's tasks in this deployment."""
        return queue_name(self.queue, self.namespace_in_use, service)

    @property
    def queue_prefix(self) -> str:
        """What every queue of this deployment starts with (then `.` and a service, or `:` and a role)."""
        return f"{self.queue}.{self.namespace_in_use}"

    # Properties, not cached: model_copy() would carry a cached value over to a copy with another account.
    @property
    def account(self) -> AccountRef:
        """The storage account these settings reach (ConfigurationError when none is configured)."""
        if self.blob_connection_string is not None:
            return account_from_connection_string(self.blob_connection_string.get_secret_value())
        if self.blob_account_url:
            return account_from_url(self.blob_account_url)
        raise ConfigurationError("set BLOBSCORE_BLOB_CONNECTION_STRING or BLOBSCORE_BLOB_ACCOUNT_URL")

    @property
    def namespace_in_use(self) -> str:
        """The configured namespace, or the one derived from the storage account."""
        return self.namespace or derive_namespace(self.account)

    @property
    def deployment(self) -> Deployment:
        """This deployment: its namespace and its storage account."""
        return Deployment(self.namespace_in_use, self.account)

    @property
    def key_prefix(self) -> str:
        """The prefix of every Redis key of this deployment (jobs, attempts, breakers, schedules)."""
        return f"{self.queue}:{self.namespace_in_use}:"

    @field_validator("namespace")
    @classmethod
    def _namespace_fits_keys(cls, value: str | None) -> str | None:
        return None if value is None else check_namespace(value)

    @model_validator(mode="after")
    def _countdowns_fit_the_visibility_timeout(self) -> Settings:
        # A countdown or a run longer than the visibility timeout would have the broker redeliver the message
        # while it is still held: the image would be scored twice at once.
        longest = max(self.retry_backoff_max_s, self.breaker_open_s * 2) + self.task_time_limit_s
        if self.visibility_timeout_s <= longest:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed the longest retry countdown "
                f"plus a task's time limit ({longest:.0f} s)"
            )
        return self

    @property
    def jobs_url(self) -> str:
        """Where job records live."""
        return self.jobs_redis_url or self.broker_url

    def results_prefix_for(self, service: str) -> str:
        """The results prefix: configured, or `blobscore-results/<service>/`."""
        return self.results_prefix if self.results_prefix is not None else f"blobscore-results/{service}/"


def _file_layers(workdir: Path, config_file: Path | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    stack_file = workdir / STACK_FILE
    if stack_file.is_file():
        values.update(json.loads(stack_file.read_text("utf-8")).get("settings", {}))
    named = config_file or _config_from_env()
    if named is not None and not named.is_file():
        raise ConfigurationError(f"config file {named} does not exist (BLOBSCORE_CONFIG or --config): fix the path")
    config = named or workdir / CONFIG_FILE
    if config.is_file():
        values.update(config_values(config))
    return values


def config_values(path: Path) -> dict[str, Any]:
    """The settings of a config file's [blobscore] and [services.NAME] tables; any unknown key is an error."""
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {path}: {exc.strerror}") from exc
    stray = sorted(set(document) - CONFIG_TABLES)
    if stray:
        raise ConfigurationError(
            f"{path}: unknown top-level key(s) {', '.join(stray)}; settings go in the [blobscore] table, "
            "services in [services.NAME], schedules in [schedules.NAME]"
        )
    table = document.get("blobscore", {})
    for key in table:
        if key not in Settings.model_fields or key == "services":
            raise ConfigurationError(f"{path}: unknown setting {key!r} in [blobscore]{_did_you_mean(key)}")
    values = dict(table)
    services = document.get("services", {})
    if services:
        values["services"] = {name: {**entry, "name": name} for name, entry in services.items()}
    return values


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, [name for name in Settings.model_fields if name != "services"], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def explain_invalid(exc: ValidationError) -> ConfigurationError:
    """One line naming each bad setting (its variable and config key), never echoing a secret's value."""
    problems = []
    for error in exc.errors(include_url=False):
        location = [str(part) for part in error["loc"]]
        name = location[0] if location else "settings"
        where = f"BLOBSCORE_{name.upper()} (or {name} in the config file)" if name in Settings.model_fields else name
        if len(location) > 1:
            where += " " + ".".join(location[1:])
        shown = "" if name in SECRET_SETTINGS or "input" not in error else f" (got {error['input']!r})"
        problems.append(f"{where}: {error['msg'].lower()}{shown}")
    return ConfigurationError("invalid setting: " + "; ".join(problems))


def _with_keys(services: dict[str, ServiceConfig]) -> dict[str, ServiceConfig]:
    # The entry point is the one place that reads the environment: each service's key comes from its variable.
    resolved = {}
    for name, service in services.items():
        value = os.environ.get(service.key_env) if service.key_env else None
        resolved[name] = service.model_copy(update={"key": SecretStr(value)}) if value else service
    return resolved


def config_path(workdir: Path | None = None) -> Path:
    """The config file the settings read: $BLOBSCORE_CONFIG, else ./blobscore.toml (which may not exist)."""
    return _config_from_env() or (workdir or Path.cwd()) / CONFIG_FILE


def _config_from_env() -> Path | None:
    value = os.environ.get("BLOBSCORE_CONFIG")
    return Path(value) if value else None


def load_settings(workdir: Path | None = None, config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the Settings: overrides > BLOBSCORE_* env > config file ([blobscore] table) > .blobscore/stack.json.

    Every mistake (a bad value, a config file that is missing, malformed or has an unknown key) is one
    ConfigurationError that names the variable or key to fix.
    """
    try:
        from_env = Settings(**overrides)
        explicit = {name: getattr(from_env, name) for name in from_env.model_fields_set}
        settings = Settings(**{**_file_layers(workdir or Path.cwd(), config_file), **explicit})
    except ValidationError as exc:
        raise explain_invalid(exc) from None  # the chained error would repeat the values, secrets included
    except SettingsError as exc:
        raise ConfigurationError(f"invalid setting: {exc} (list settings take JSON, e.g. '[\"a\", \"b\"]')") from None
    if not settings.services:
        return settings
    return settings.model_copy(update={"services": _with_keys(settings.services)})
