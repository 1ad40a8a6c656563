"""The deployment files (docker-compose.yml, deploy/docker, deploy/k8s) and the pure parts of deploy/azureml.

None of these files can be run here (no Docker engine, no cluster, no Azure subscription), so what can be checked
offline is checked: every `blobscore ...` command they run parses against the real CLI, every BLOBSCORE_* variable
is a real setting and every value validates, no secret is written into them, Azurite is never loose, the grace
periods and resources fit the worker, each region's workers get its services' keys and scale on its services'
queues, the beat and the exporter run once per deployment with the workers' settings (compose and Kubernetes), the
exporter's port, Service, scrape annotations, probes and prometheus.yml's targets agree, and the Azure ML SDK calls
use keyword arguments the installed SDK has.

The Kubernetes checks read what `kubectl kustomize` renders for each overlay of deploy/k8s/overlays (the objects
as they would be applied), so kubectl must be installed: scripts/ensure-validators.sh installs it. The validators
themselves (schemas, hadolint, docker-compose) are tests/deploy/test_validators.py.

PyYAML is a hard dependency of this module (today it comes with azureml-core, which the Makefile installs).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from deploy.azureml import deploy_fpga as fpga
from deploy.local.azurite import AZURITE_KEY
from deploy.standin.cli import KEY_ENV_VAR as STANDIN_KEY_ENV
from producer import cli
from producer.exporter import exporter_registry
from worker.models.catalog import DEFAULT_INPUT_NAME, PROFILES
from worker.redis_client import SOCKET_TIMEOUT_S
from worker.settings import Settings, load_settings
from worker.worker_main import queues_to_consume, services_to_consume

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKER_DIR = ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
AZURITE_DOCKERFILE = DOCKER_DIR / "azurite.Dockerfile"
COMPOSE_SECRETS = DOCKER_DIR / "secrets.env"
COMPOSE_SECRETS_EXAMPLE = DOCKER_DIR / "secrets.env.example"
K8S_DIR = ROOT / "deploy" / "k8s"
K8S_BASE = K8S_DIR / "base"
K8S_OVERLAYS = K8S_DIR / "overlays"
K8S_CONFIG = K8S_BASE / "blobscore.toml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
SECRET_NAME = "blobscore-secrets"
# What the base marks as an overlay's to fill in (deploy/k8s/base/worker.yaml, autoscaling.yaml).
TEMPLATE_VALUE = "set-by-overlay"
# Capacity of one FPGA scoring service: about 40 images in flight (its request queue); more only wait there.
IMAGES_IN_FLIGHT_PER_SERVICE = 40
# The cooldown before a region's last worker is stopped (KEDA's cooldownPeriod) is at least this long.
MIN_COOLDOWN_S = 300

# The BLOBSCORE_* variables that are not Settings fields, and the code that reads each.
NON_SETTINGS_VARIABLES = {
    "BLOBSCORE_CONFIG": ROOT / "worker" / "settings.py",  # the config file's path, read by the settings loader
    STANDIN_KEY_ENV: ROOT / "deploy" / "standin" / "cli.py",  # the stand-in's key
}
# One worker process with 16 threads in flight (bench/pipeline.py reports it; its target is <= 150 MB).
MEASURED_WORKER_RSS_MIB = 130
# `blobscore exporter` after start-up and a scrape, with the cluster's blobscore.toml (VmRSS 104 MiB, Python 3.11).
MEASURED_EXPORTER_RSS_MIB = 105
# Deployments without a PodDisruptionBudget: one replica, whose loss for a drain costs a scrape or two; a budget of
# one on one replica would block every node drain.
NO_DISRUPTION_BUDGET = {"blobscore-exporter"}
SECRET_NAME_PATTERN = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CONNECTION_STRING|SAS", re.IGNORECASE)


# --------------------------------------------------------------------------------------------- helpers


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty document of a YAML file."""
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def compose() -> dict[str, Any]:
    """docker-compose.yml, anchors and merge keys resolved."""
    (document,) = load_yaml_documents(COMPOSE_FILE)
    return document


def compose_services() -> dict[str, dict[str, Any]]:
    """The compose services by name."""
    services: dict[str, dict[str, Any]] = compose()["services"]
    return services


def k8s_source_files() -> list[Path]:
    """Every file of deploy/k8s that kustomize reads: manifests, patches, kustomizations, blobscore.toml."""
    return sorted(path for path in K8S_DIR.rglob("*") if path.suffix in (".yaml", ".toml"))


def base_manifest_files() -> list[Path]:
    """The manifests of deploy/k8s/base (its kustomization excluded)."""
    return sorted(path for path in K8S_BASE.glob("*.yaml") if path.name != "kustomization.yaml")


def overlay_regions() -> list[str]:
    """The regions with an overlay (deploy/k8s/overlays/REGION/kustomization.yaml)."""
    return sorted(path.parent.name for path in K8S_OVERLAYS.glob("*/kustomization.yaml"))


@functools.cache
def rendered_text(region: str) -> str:
    """What `kubectl kustomize deploy/k8s/overlays/REGION` renders (once per session)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: run scripts/ensure-validators.sh (it renders deploy/k8s/overlays)")
    run = subprocess.run([kubectl, "kustomize", str(K8S_OVERLAYS / region)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 0, f"kubectl kustomize deploy/k8s/overlays/{region}: {run.stderr}"
    return run.stdout


def rendered(region: str) -> list[dict[str, Any]]:
    """The objects an overlay renders."""
    return [doc for doc in yaml.safe_load_all(rendered_text(region)) if doc is not None]


def k8s_objects() -> list[dict[str, Any]]:
    """Every object of every overlay, once: the shared ones render identically in each (checked below)."""
    unique: dict[tuple[str, str], dict[str, Any]] = {}
    for region in overlay_regions():
        for doc in rendered(region):
            unique.setdefault((doc["kind"], doc["metadata"]["name"]), doc)
    return list(unique.values())


def deployments() -> list[dict[str, Any]]:
    """The Deployments."""
    return [doc for doc in k8s_objects() if doc["kind"] == "Deployment"]


def config_map() -> dict[str, Any]:
    """The generated ConfigMap blobscore-config-<hash> (the same in every overlay)."""
    (found,) = [doc for doc in k8s_objects() if doc["kind"] == "ConfigMap"]
    return found


def k8s_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(deployment name, pod spec, container) for every container of every Deployment."""
    for deployment in deployments():
        pod = deployment["spec"]["template"]["spec"]
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            yield deployment["metadata"]["name"], pod, container


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def running(objects: list[dict[str, Any]], command: str) -> list[dict[str, Any]]:
    """The Deployments among `objects` whose containers run `blobscore COMMAND`."""
    return [
        doc for doc in objects
        if doc["kind"] == "Deployment"
        and any(c.get("args", [])[:1] == [command] for c in doc["spec"]["template"]["spec"]["containers"])
    ]


def selected_by(selector: dict[str, str], objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Deployments among `objects` whose pods a label selector picks."""
    return [doc for doc in objects if doc["kind"] == "Deployment" and selector.items() <= pod_labels(doc).items()]


def prometheus_job(name: str) -> dict[str, Any]:
    """A scrape job of deploy/prometheus/prometheus.yml."""
    (document,) = load_yaml_documents(PROMETHEUS_CONFIG)
    (job,) = [job for job in document["scrape_configs"] if job["job_name"] == name]
    return job


def exporter_target() -> tuple[str, int]:
    """(host, port) prometheus.yml scrapes the exporter at."""
    (static,) = prometheus_job("blobscore-exporter")["static_configs"]
    (target,) = static["targets"]
    host, _, port = target.rpartition(":")
    return host, int(port)


def dockerfile_stages(path: Path) -> dict[str, dict[str, Any]]:
    """Per build stage (in order): its FROM, ENTRYPOINT and CMD (JSON form), and its ARG defaults."""
    logical = re.sub(r"\\\n\s*", " ", path.read_text("utf-8"))
    stages: dict[str, dict[str, Any]] = {}
    args: dict[str, str] = {}
    current: dict[str, Any] | None = None
    for raw in logical.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            image, _, name = re.sub(r"\s+AS\s+", " AS ", rest, flags=re.IGNORECASE).partition(" AS ")
            current = {"from": image.strip(), "args": dict(args)}
            stages[name.strip() or f"stage{len(stages)}"] = current
        elif instruction == "ARG":
            key, _, default = rest.partition("=")
            (current["args"] if current is not None else args)[key.strip()] = default.strip()
        elif instruction in ("ENTRYPOINT", "CMD") and current is not None:
            current[instruction.lower()] = json.loads(rest)
    return stages


def blobscore_group() -> Any:
    """The `blobscore` command as click sees it (typer may bring its own copy of click), optional apps mounted."""
    cli._mount_optional_apps()
    group = typer.main.get_command(cli.app)
    assert is_group(group)
    return group


def is_group(command: Any) -> bool:
    """A command with subcommands."""
    return isinstance(getattr(command, "commands", None), dict)


def check_blobscore_argv(group: Any, argv: list[str]) -> dict[str, Any]:
    """Fail unless `blobscore ARGV` names real (sub)commands and its options parse; the parsed parameters (defaults
    included) of the command it runs."""
    command = group
    path = ["blobscore"]
    rest = list(argv)
    while is_group(command) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        sub = command.commands.get(name)
        assert sub is not None, f"`{' '.join(path)}` has no command {name!r} (it has {sorted(command.commands)})"
        command, path = sub, [*path, name]
    assert not is_group(command) or command.invoke_without_command, (
        f"`{' '.join(path)}` needs a subcommand: {sorted(command.commands)}"
    )
    try:
        context = command.make_context(" ".join(path), rest)  # parses and validates; runs nothing
    except Exception as exc:  # click's UsageError family (typer may vendor click)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        pytest.fail(f"`{' '.join(path)} {' '.join(rest)}`: {message}")
    params: dict[str, Any] = context.params
    return params


def our_image_services() -> dict[str, dict[str, Any]]:
    """The compose services built from deploy/docker/Dockerfile."""
    return {
        name: service
        for name, service in compose_services().items()
        if isinstance(service.get("build"), dict) and service["build"].get("dockerfile") == "deploy/docker/Dockerfile"
    }


def compose_argv(service: dict[str, Any]) -> list[str]:
    """What a service built from our Dockerfile runs after the `blobscore` entrypoint."""
    stage = dockerfile_stages(DOCKERFILE)[service["build"].get("target", list(dockerfile_stages(DOCKERFILE))[-1])]
    assert "entrypoint" not in service, "the blobscore images' entrypoint is overridden"
    assert stage.get("entrypoint") == ["blobscore"]
    command = service.get("command", stage.get("cmd", []))
    assert isinstance(command, list), "use the exec (list) form for commands"
    return [str(part) for part in command]


def compose_running(command: str) -> dict[str, dict[str, Any]]:
    """The compose services built from our Dockerfile that run `blobscore COMMAND`."""
    return {name: service for name, service in our_image_services().items() if compose_argv(service)[:1] == [command]}


def compose_settings(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch, workdir: Path) -> Settings:
    """The Settings a compose service's process builds: its env_file (the example's values), under its environment,
    and the blobscore.toml it mounts."""
    env: dict[str, str] = {}
    for env_file in service.get("env_file", []):
        assert env_file == str(COMPOSE_SECRETS.relative_to(ROOT))
        env.update(env_file_names(COMPOSE_SECRETS_EXAMPLE))
    env.update({name: str(value) for name, value in service.get("environment", {}).items()})
    mount = next(volume for volume in service["volumes"] if volume["target"] == env["BLOBSCORE_CONFIG"])
    return settings_from(env, (ROOT / mount["source"]).resolve(), monkeypatch, workdir)


def env_file_names(path: Path) -> dict[str, str]:
    """NAME=value lines of an env file."""
    values = {}
    for line in path.read_text("utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path.name}: not NAME=value: {line!r}"
            values[name.strip()] = value
    return values


def settings_variable_names() -> set[str]:
    """BLOBSCORE_<FIELD> for every Settings field."""
    return {f"BLOBSCORE_{name.upper()}" for name in Settings.model_fields}


def assert_known_variable(name: str, where: str) -> None:
    if name.startswith("BLOBSCORE_"):
        assert name in settings_variable_names() | set(NON_SETTINGS_VARIABLES), (
            f"{where}: {name} is not a setting (worker/settings.py Settings.model_fields)"
        )


def quantity_mib(value: str) -> float:
    """A Kubernetes memory quantity in MiB."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match is not None, f"not a quantity: {value!r}"
    number, unit = match.groups()
    factor = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20, "": 1 / 2**20}[unit]
    return float(number) * factor


def duration_s(value: str) -> float:
    """A compose duration ('2m', '90s', '1m30s') in seconds."""
    parts = re.findall(r"([0-9.]+)(h|m|s|ms|us)", value)
    assert "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[u] for n, u in parts)


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment variables with literal values."""
    return {item["name"]: str(item["value"]) for item in container.get("env", []) if "value" in item}


def secret_env(container: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The container's environment variables filled from Secrets: name -> secretKeyRef."""
    return {
        item["name"]: item["valueFrom"]["secretKeyRef"]
        for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }


def settings_from(env: dict[str, str], config: Path, monkeypatch: pytest.MonkeyPatch, workdir: Path) -> Settings:
    """The Settings a process with `env` and `config` would build (BLOBSCORE_CONFIG is a container path)."""
    for name in settings_variable_names() | set(NON_SETTINGS_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if name != "BLOBSCORE_CONFIG":
            monkeypatch.setenv(name, value)
    return load_settings(workdir=workdir, config_file=config)


# --------------------------------------------------------------------------------------------- secrets


PLACEHOLDER = re.compile(r"<[^>]*>|replace|example|change-?me|\$\{", re.IGNORECASE)


def secret_findings(text: str, allowed: frozenset[str] = frozenset()) -> list[str]:
    """Secret-looking literals in a text: account keys, SAS signatures, URL passwords, long key-like runs."""
    findings = []
    for match in re.finditer(r"AccountKey=([^;\s\"']+)", text):
        if match.group(1) not in allowed and not PLACEHOLDER.search(match.group(1)):
            findings.append(f"account key {match.group(1)[:6]}...")
    for match in re.finditer(r"(?:SharedAccessSignature|[?&]sig)=([^;&\s\"']+)", text):
        if not PLACEHOLDER.search(match.group(1)):
            findings.append(f"SAS signature {match.group(1)[:6]}...")
    for match in re.finditer(r"[a-z][a-z0-9+.-]*://[^/\s:@\"']*:([^@/\s\"']+)@", text):
        if not PLACEHOLDER.search(match.group(1)):
            findings.append("password in a URL")
    for match in re.finditer(r"(?<![A-Za-z0-9+/=_-])([A-Za-z0-9+/_-]{32,}={0,2})", text):
        if match.group(1) not in allowed and looks_random(match.group(1)):
            findings.append(f"key-like string {match.group(1)[:6]}...")
    return findings


def looks_random(run: str) -> bool:
    """Base64 or hex key material: mixed case with many capitals and digits, or long hex (names and paths are not)."""
    if re.fullmatch(r"[0-9a-fA-F]+", run):
        return sum(char.isdigit() for char in run) >= 0.2 * len(run)
    mixed = any(char.islower() for char in run) and any(char.isupper() or char.isdigit() for char in run)
    return mixed and sum(char.isupper() or char.isdigit() for char in run) >= 0.3 * len(run)


def deployment_texts() -> dict[str, str]:
    """The raw text of every deployment file a secret could be written into."""
    paths = [COMPOSE_FILE, DOCKERFILE, AZURITE_DOCKERFILE, DOCKER_DIR / "blobscore.toml", *k8s_source_files()]
    return {str(path.relative_to(ROOT)): path.read_text("utf-8") for path in paths}


def test_the_secret_finder_finds_secrets() -> None:
    assert secret_findings("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=" + "Zm9v" * 16 + ";")
    assert secret_findings("rediss://:hunter2hunter2@cache.redis.cache.windows.net:6380/0")
    assert secret_findings("https://a.blob.core.windows.net/c?sv=2024&sig=abcdef0123")
    assert secret_findings("token: " + "a1B2" * 12)
    assert not secret_findings("rediss://:<password>@cache.redis.cache.windows.net:6380/0")
    assert not secret_findings("AccountKey=<key>;")
    assert not secret_findings("classifier_1/resnet_v1_50/predictions/Softmax:0 ssd_300_vgg/block10_box/Reshape_1:0")


@pytest.mark.parametrize("name", sorted(deployment_texts()))
def test_no_secret_is_written_into_the_deployment_files(name: str) -> None:
    assert secret_findings(deployment_texts()[name]) == []


def test_the_compose_secrets_come_from_the_env_file_only() -> None:
    for name, service in compose_services().items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: use the mapping form of environment"
        for variable, value in environment.items():
            assert not SECRET_NAME_PATTERN.search(variable), f"{name}: {variable} belongs in the env_file"
            assert secret_findings(str(value)) == [], f"{name}: {variable}"
        for env_file in service.get("env_file", []):
            assert env_file == str(COMPOSE_SECRETS.relative_to(ROOT)), f"{name}: unexpected env_file {env_file}"
    assert not COMPOSE_SECRETS.exists() or "secrets.env" in (ROOT / ".gitignore").read_text("utf-8"), (
        "deploy/docker/secrets.env exists and is not ignored by git"
    )


def test_the_compose_secrets_example_holds_placeholders_and_azurites_published_key_only() -> None:
    values = env_file_names(COMPOSE_SECRETS_EXAMPLE)
    assert set(values) == {STANDIN_KEY_ENV, "BLOBSCORE_BLOB_CONNECTION_STRING"}
    assert PLACEHOLDER.search(values[STANDIN_KEY_ENV])
    text = COMPOSE_SECRETS_EXAMPLE.read_text("utf-8")
    assert secret_findings(text, allowed=frozenset({AZURITE_KEY})) == []
    assert "AccountName=devstoreaccount1" in values["BLOBSCORE_BLOB_CONNECTION_STRING"]
    assert "BlobEndpoint=http://azurite:10000/devstoreaccount1" in values["BLOBSCORE_BLOB_CONNECTION_STRING"]


def test_kubernetes_secrets_come_from_the_secret_by_reference_only() -> None:
    for deployment, _pod, container in k8s_containers():
        for item in container.get("env", []):
            if SECRET_NAME_PATTERN.search(item["name"]) or item["name"] == "BLOBSCORE_BROKER_URL":
                assert "value" not in item, f"{deployment}: {item['name']} has a literal value"
                ref = item["valueFrom"]["secretKeyRef"]
                assert ref == {"name": SECRET_NAME, "key": item["name"]}, f"{deployment}: {item['name']}"
        assert "envFrom" not in container, f"{deployment}: name each secret a pod gets, do not import them all"
    assert not [doc for doc in k8s_objects() if doc["kind"] == "Secret"], "no Secret object: create it from README"
    for auth in (doc for doc in k8s_objects() if doc["kind"] == "TriggerAuthentication"):
        refs = auth["spec"]["secretTargetRef"]
        assert set(auth["spec"]) == {"secretTargetRef"}, "KEDA gets the Redis address and password from the Secret"
        assert {ref["name"] for ref in refs} == {SECRET_NAME}
        assert {ref["parameter"]: ref["key"] for ref in refs} == {"address": "REDIS_ADDRESS",
                                                                  "password": "REDIS_PASSWORD"}


# --------------------------------------------------------------------------------------------- commands


def all_blobscore_argvs() -> dict[str, list[str]]:
    """Every `blobscore ...` invocation of the Dockerfile, the compose file and the Kubernetes manifests."""
    argvs: dict[str, list[str]] = {}
    for stage_name, stage in dockerfile_stages(DOCKERFILE).items():
        if stage.get("entrypoint") == ["blobscore"] and "cmd" in stage:
            argvs[f"Dockerfile {stage_name} CMD"] = stage["cmd"]
    for name, service in our_image_services().items():
        argvs[f"compose {name}"] = compose_argv(service)
    for deployment, _pod, container in k8s_containers():
        assert container.get("command") == ["blobscore"], f"{deployment}: every container runs blobscore"
        argvs[f"k8s {deployment}/{container['name']}"] = [str(arg) for arg in container.get("args", [])]
    return argvs


def test_every_blobscore_command_used_is_a_real_command() -> None:
    group = blobscore_group()
    argvs = all_blobscore_argvs()
    used = {argv[0] for argv in argvs.values()}
    assert {"worker", "beat", "exporter", "standin", "demo"} <= used
    for where in ("compose", "k8s"):
        commands = {argv[0] for key, argv in argvs.items() if key.startswith(where)}
        assert {"worker", "beat", "exporter"} <= commands, where
    for where, argv in argvs.items():
        assert argv, f"{where}: no command"
        check_blobscore_argv(group, argv)


def test_the_command_checker_rejects_unknown_commands_and_options() -> None:
    group = blobscore_group()
    with pytest.raises(AssertionError, match="no command 'wrker'"):
        check_blobscore_argv(group, ["wrker"])
    with pytest.raises(pytest.fail.Exception, match="--regio"):
        check_blobscore_argv(group, ["worker", "--regio", "eastus"])
    with pytest.raises(AssertionError, match="needs a subcommand"):
        check_blobscore_argv(group, ["services"])
    check_blobscore_argv(group, ["services", "list", "--json"])


def test_the_images_run_blobscore_as_an_unprivileged_user() -> None:
    stages = dockerfile_stages(DOCKERFILE)
    assert stages["base"]["from"] == "${PYTHON_IMAGE}"
    assert stages["base"]["args"]["PYTHON_IMAGE"] == "python:3.11-slim"
    assert list(stages)[-1] == "worker", "the default target (the last stage) is the worker image"
    for name in ("standin", "demo", "worker"):
        assert stages[name]["entrypoint"] == ["blobscore"]
    text = DOCKERFILE.read_text("utf-8")
    assert text.count("USER 10001:10001") == 3, "each final stage switches to the numeric unprivileged user"
    assert '[standin]"' in text
    assert '[samples]"' in text
    targets = {service["build"].get("target") for service in our_image_services().values()}
    assert targets <= set(stages), f"compose builds unknown targets {targets - set(stages)}"


# --------------------------------------------------------------------------------------------- compose


def test_compose_has_the_stack_and_a_one_shot_demo_profile() -> None:
    services = compose_services()
    assert set(services) >= {"redis", "azurite", "standin", "worker", "beat", "exporter", "prometheus", "demo"}
    assert services["demo"]["profiles"] == ["demo"]
    assert services["demo"]["restart"] == "no"
    assert compose_argv(services["demo"])[0] == "demo"
    for name, service in services.items():
        assert "container_name" not in service, f"{name}: a fixed container name cannot scale"
        assert "ports" not in service, f"{name}: publishes a port"
    assert "--appendonly" in services["redis"]["command"]
    appendonly = services["redis"]["command"].index("--appendonly")
    assert services["redis"]["command"][appendonly + 1] == "yes"


def test_azurite_runs_the_pinned_npm_package_and_is_never_loose() -> None:
    service = compose_services()["azurite"]
    assert service["build"]["dockerfile"] == AZURITE_DOCKERFILE.name
    assert (ROOT / service["build"]["context"]) == DOCKER_DIR
    (stage,) = dockerfile_stages(AZURITE_DOCKERFILE).values()
    argv = [*stage["entrypoint"], *service.get("command", stage.get("cmd", []))]
    assert argv[0] == "azurite-blob"
    assert "--loose" not in argv
    assert "-L" not in argv
    assert {"--skipApiVersionCheck", "--disableTelemetry"} <= set(argv)
    assert not any("--loose" in json.dumps(value) for value in compose_services().values())
    assert "mcr.microsoft.com" not in stage["from"]
    assert "mcr.microsoft.com" not in stage["args"].get("NODE_IMAGE", "")
    pinned = json.loads((ROOT / "package.json").read_text("utf-8"))["devDependencies"]["azurite"]
    assert stage["args"]["AZURITE_VERSION"] == pinned, "azurite.Dockerfile and package.json pin different Azurites"
    assert service["image"].endswith(f":{pinned}")


def test_compose_settings_are_real_and_the_worker_reaches_the_standin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    services = compose_services()
    for name, service in services.items():
        for variable in service.get("environment", {}):
            assert_known_variable(variable, f"compose {name}")
    for variable in env_file_names(COMPOSE_SECRETS_EXAMPLE):
        assert_known_variable(variable, COMPOSE_SECRETS_EXAMPLE.name)
    worker = services["worker"]
    config_path = worker["environment"]["BLOBSCORE_CONFIG"]
    mount = next(volume for volume in worker["volumes"] if volume["target"] == config_path)
    config = (ROOT / mount["source"]).resolve()
    assert mount["read_only"]
    assert config == DOCKER_DIR / "blobscore.toml"
    env = {**{k: str(v) for k, v in worker["environment"].items()}, **env_file_names(COMPOSE_SECRETS_EXAMPLE)}
    settings = settings_from(env, config, monkeypatch, tmp_path)
    service = settings.service_config()
    standin = compose_argv(services["standin"])
    option = dict(zip(standin[1::2], standin[2::2], strict=False))
    assert (service.address, service.port, service.route, service.model) == (
        "standin", int(option["--port"]), option["--service-name"], option["--model"])
    assert service.key_env == STANDIN_KEY_ENV
    assert service.key is not None, "the worker gets the stand-in's key"
    assert queues_to_consume(settings) == [settings.queue_for("local")]
    assert services["demo"]["environment"].items() <= worker["environment"].items()


def test_the_compose_worker_is_given_time_to_finish_its_images() -> None:
    worker = compose_services()["worker"]
    defaults = Settings()
    assert duration_s(worker["stop_grace_period"]) > max(defaults.task_time_limit_s, defaults.soft_shutdown_timeout_s)
    assert "REMAP_SIGTERM" not in worker.get("environment", {})


def services_depending_on(name: str) -> set[str]:
    """The compose services that wait for service NAME."""
    return {other for other, service in compose_services().items() if name in service.get("depends_on", {})}


def test_compose_runs_one_beat_and_one_exporter_with_the_workers_image_and_settings() -> None:
    document = compose()
    worker = document["services"]["worker"]
    for command in ("beat", "exporter"):
        found = compose_running(command)
        assert list(found) == [command], f"one compose service, named {command}, runs `blobscore {command}`: {found}"
        service = found[command]
        assert service["build"] == {**document["x-blobscore-build"], "target": "worker"} == worker["build"], command
        assert service["image"] == worker["image"], command
        assert "profiles" not in service, f"{command}: `docker compose up` must start it"
        assert service["restart"] == "unless-stopped", command
        assert not {"deploy", "scale"} & set(service), f"{command}: one replica"
        # The settings anchor and the worker's blobscore.toml, and nothing of the worker's own (threads, metrics).
        assert service["environment"] == document["x-blobscore-env"], command
        assert service["volumes"] == [document["x-blobscore-config"]] == worker["volumes"], command
        assert service["depends_on"]["redis"] == {"condition": "service_healthy"}, command
        assert "standin" not in service["depends_on"], f"{command} scores nothing"
    assert services_depending_on("azurite") >= {"beat"}, "the beat lists the containers of its schedules"


def test_the_compose_beat_and_exporter_share_the_workers_deployment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    services = compose_services()
    worker = compose_settings(services["worker"], monkeypatch, tmp_path)
    worker_queues = {name: worker.queue_for(name) for name in worker.all_services()}
    for name in ("beat", "exporter"):
        # No namespace is pinned on compose: each derives it from the storage account (the env_file's connection
        # string), so without it there is no key prefix and no queue name at all (ConfigurationError).
        settings = compose_settings(services[name], monkeypatch, tmp_path)
        assert settings.key_prefix == worker.key_prefix, name
        assert {service: settings.queue_for(service) for service in settings.all_services()} == worker_queues, name
        assert (settings.broker_url, settings.jobs_url) == (worker.broker_url, worker.jobs_url), name
    beat = compose_settings(services["beat"], monkeypatch, tmp_path)
    assert beat.account == worker.account, "the beat lists the workers' storage account"
    exporter_registry(compose_settings(services["exporter"], monkeypatch, tmp_path))  # builds; connects to nothing


def test_the_compose_beat_gets_the_time_the_kubernetes_beat_gets() -> None:
    beat = compose_services()["beat"]
    (k8s_beat,) = running(k8s_objects(), "beat")
    assert "REMAP_SIGTERM" not in beat["environment"]
    grace_s = k8s_beat["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert duration_s(beat["stop_grace_period"]) >= grace_s, "a scheduled run in progress gets as long as on Kubernetes"


def test_prometheus_scrapes_the_compose_worker_and_exporter_where_they_serve() -> None:
    group = blobscore_group()
    services = compose_services()
    host, port = exporter_target()
    assert host in services, f"prometheus.yml scrapes the exporter at {host}:{port}: no compose service {host!r}"
    argv = compose_argv(services[host])
    assert argv[0] == "exporter", f"compose {host} runs `blobscore {' '.join(argv)}`"
    params = check_blobscore_argv(group, argv)
    assert params["port"] == port
    assert params["host"] == "0.0.0.0", "it must listen beyond its container's loopback"
    (discovery,) = prometheus_job("blobscore-worker")["dns_sd_configs"]
    (name,) = discovery["names"]
    assert compose_argv(services[name])[0] == "worker"
    assert int(services[name]["environment"]["BLOBSCORE_METRICS_PORT"]) == discovery["port"]
    assert set(services["prometheus"]["depends_on"]) >= {name, host}


def test_the_compose_exporters_healthcheck_asks_its_port_and_outlasts_a_redis_that_hangs() -> None:
    service = compose_services()["exporter"]
    params = check_blobscore_argv(blobscore_group(), compose_argv(service))
    check = service["healthcheck"]
    assert check["test"][:3] == ["CMD", "python", "-c"]
    code = check["test"][3]
    assert re.findall(r"http://127\.0\.0\.1:(\d+)(/[^'\"]*)", code) == [(str(params["port"]), "/metrics")]
    # A scrape against a Redis that accepts and never answers takes its socket timeout (10 s), then answers 200
    # with blobscore_exporter_redis_up 0: neither that nor a Redis that is down may make the exporter unhealthy.
    (inner,) = [float(value) for value in re.findall(r"timeout=([0-9.]+)", code)]
    assert SOCKET_TIMEOUT_S < inner < duration_s(check["timeout"])


# --------------------------------------------------------------------------------------------- kubernetes


def test_the_base_lists_every_manifest_and_generates_the_config() -> None:
    (kustomization,) = load_yaml_documents(K8S_BASE / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == [path.name for path in base_manifest_files()]
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == "blobscore-config"
    assert generator["files"] == [K8S_CONFIG.name]
    assert kustomization["namespace"] == "blobscore"
    assert {image["name"] for image in kustomization["images"]} == {"blobscore"}
    assert not list(K8S_DIR.glob("*.yaml")), "manifests belong in base/ or overlays/REGION/"


def test_every_overlay_builds_on_the_base_and_fills_in_the_whole_worker_template() -> None:
    assert overlay_regions(), "no overlay"
    template = {("Deployment", "blobscore-worker"), ("PodDisruptionBudget", "blobscore-worker"),
                ("Service", "blobscore-worker"), ("ScaledObject", "blobscore-worker")}
    for region in overlay_regions():
        overlay = K8S_OVERLAYS / region
        (kustomization,) = load_yaml_documents(overlay / "kustomization.yaml")
        assert kustomization["resources"] == ["../../base"], region
        assert set(kustomization) <= {"apiVersion", "kind", "resources", "patches"}, f"{region}: more than patches"
        patches = kustomization["patches"]
        assert {(p["target"]["kind"], p["target"]["name"]) for p in patches} == template, region
        for patch in patches:
            assert patch.get("options") == {"allowNameChange": True}, region
            assert "path" not in patch or (overlay / patch["path"]).is_file(), f"{region}: {patch['path']}"
        # A patch whose target is misspelt matches nothing, silently: the base's value would stay.
        assert TEMPLATE_VALUE not in rendered_text(region), f"{region}: a template value was not replaced"


def test_each_overlay_adds_only_its_region_to_shared_objects_that_render_identically() -> None:
    shared: dict[tuple[str, str], dict[str, Any]] = {}
    for region in overlay_regions():
        own = []
        for doc in rendered(region):
            labels = doc["metadata"].get("labels", {})
            assert labels.get("app.kubernetes.io/part-of") == "blobscore"
            assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "blobscore"
            if "blobscore/region" in labels:
                assert labels["blobscore/region"] == region
                assert doc["metadata"]["name"] == f"blobscore-worker-{region}"
                own.append(doc["kind"])
            else:
                key = (doc["kind"], doc["metadata"]["name"])
                assert shared.setdefault(key, doc) == doc, f"{key} differs in overlays/{region}"
        assert sorted(own) == ["Deployment", "PodDisruptionBudget", "ScaledObject", "Service"], region
    # Applying several overlays to one cluster converges on one of each of these.
    assert sorted(kind for kind, _name in shared) == [
        "ConfigMap", "Deployment", "Deployment", "Namespace", "PodDisruptionBudget", "Service", "TriggerAuthentication"]
    assert {name for kind, name in shared if kind in ("Deployment", "Service")} == {"blobscore-beat",
                                                                                   "blobscore-exporter"}


def test_every_manifest_parses_and_every_deployment_has_a_disruption_budget() -> None:
    for region in overlay_regions():
        objects = rendered(region)
        budgets = [doc for doc in objects if doc["kind"] == "PodDisruptionBudget"]
        for deployment in (doc for doc in objects if doc["kind"] == "Deployment"):
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
            matching = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
            if deployment["metadata"]["name"] in NO_DISRUPTION_BUDGET:
                assert deployment["spec"]["replicas"] == 1, "more than one replica: give it a disruption budget"
                assert not matching, f"{deployment['metadata']['name']}: a budget on one replica blocks drains"
            else:
                assert len(matching) == 1, f"{deployment['metadata']['name']}: {len(matching)} disruption budgets"


def test_kubernetes_settings_are_real_and_validate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    document = tomllib.loads(K8S_CONFIG.read_text("utf-8"))
    assert set(document) <= {"blobscore", "services", "schedules"}
    for key in document.get("blobscore", {}):
        assert f"BLOBSCORE_{key.upper()}" in settings_variable_names(), f"blobscore.toml: {key} is not a setting"
    generated = config_map()
    assert generated["data"] == {K8S_CONFIG.name: K8S_CONFIG.read_text("utf-8")}
    assert re.fullmatch(r"blobscore-config-[a-z0-9]+", generated["metadata"]["name"])
    for deployment, pod, container in k8s_containers():
        env = literal_env(container)
        for name in [*env, *secret_env(container)]:
            assert_known_variable(name, deployment)
        mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
        assert env["BLOBSCORE_CONFIG"] == f"{mount['mountPath']}/blobscore.toml"
        assert mount["readOnly"]
        volume = next(v for v in pod["volumes"] if v["name"] == "config")
        assert volume["configMap"]["name"] == generated["metadata"]["name"]
        settings = settings_from(env, K8S_CONFIG, monkeypatch, tmp_path)
        # Pinned (not derived from the storage account), so the queue names KEDA watches are known here.
        assert settings.namespace == "prod", "blobscore.toml must pin [blobscore] namespace"


def worker_deployments() -> list[tuple[str, dict[str, Any], dict[str, Any], str]]:
    """(name, pod spec, container, region) of every worker Deployment."""
    found = []
    for name, pod, container in k8s_containers():
        args = container.get("args", [])
        if args[:1] == ["worker"]:
            assert "--region" in args, f"{name}: a Kubernetes worker serves one region"
            found.append((name, pod, container, args[args.index("--region") + 1]))
    return found


def k8s_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """The settings every pod builds from the ConfigMap (the namespace is pinned there)."""
    return settings_from({}, K8S_CONFIG, monkeypatch, tmp_path)


def test_a_worker_deployment_per_region_with_its_services_keys_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    workers = worker_deployments()
    regions = {region for *_, region in workers}
    settings = k8s_settings(monkeypatch, tmp_path)
    assert regions == {service.region for service in settings.services.values()}, "a region without workers"
    assert sorted(regions) == overlay_regions(), "an overlay per region, and a region per overlay"
    assert len(workers) == len(regions)
    for name, pod, container, region in workers:
        assert name == f"blobscore-worker-{region}"
        assert any(doc["metadata"]["name"] == name for doc in rendered(region)), f"{name} not in overlays/{region}"
        assert pod["nodeSelector"] == {"topology.kubernetes.io/region": region}
        assert queues_to_consume(settings, region)  # raises when the region has no service
        wanted = {s.key_env for s in settings.services.values() if s.region == region and s.key_env}
        given = {n for n in secret_env(container) if not n.startswith("BLOBSCORE_")}
        assert given == wanted, f"{name}: keys {sorted(given)}, its services need {sorted(wanted)}"


def test_worker_pods_fit_the_worker_and_get_time_to_finish_their_images() -> None:
    defaults = Settings()
    for name, pod, container, _region in worker_deployments():
        env = literal_env(container)
        assert "REMAP_SIGTERM" not in env, f"{name}: a cold shutdown cannot cancel the thread pool's tasks"
        soft = float(env.get("BLOBSCORE_SOFT_SHUTDOWN_TIMEOUT_S", defaults.soft_shutdown_timeout_s))
        task = float(env.get("BLOBSCORE_TASK_TIME_LIMIT_S", defaults.task_time_limit_s))
        assert pod["terminationGracePeriodSeconds"] > max(soft, task), name
        resources = container["resources"]
        request = quantity_mib(resources["requests"]["memory"])
        limit = quantity_mib(resources["limits"]["memory"])
        assert request >= MEASURED_WORKER_RSS_MIB * 1.2, f"{name}: request below the measured RSS plus headroom"
        assert limit >= 2 * request, f"{name}: no room for the images in flight"
        assert "cpu" in resources["requests"]
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001


def test_each_region_scales_on_the_backlog_of_its_services_queues(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = k8s_settings(monkeypatch, tmp_path)
    for name, _pod, container, region in worker_deployments():
        objects = rendered(region)
        (deployment,) = [d for d in objects if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
        (scaled,) = [d for d in objects if d["kind"] == "ScaledObject"]
        (auth,) = [d for d in objects if d["kind"] == "TriggerAuthentication"]
        spec = scaled["spec"]
        assert spec["scaleTargetRef"] == {"name": name}
        assert "replicas" not in deployment["spec"], f"{name}: KEDA owns the replica count; apply would reset it"
        concurrency = int(literal_env(container)["BLOBSCORE_WORKER_CONCURRENCY"])
        services = services_to_consume(settings, region)
        # One trigger per service queue of the region, named exactly as the worker names its queues.
        assert [t["metadata"]["listName"] for t in spec["triggers"]] == queues_to_consume(settings, region)
        assert [t["name"] for t in spec["triggers"]] == services
        for trigger in spec["triggers"]:
            assert trigger["type"] == "redis"
            assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
            metadata = trigger["metadata"]
            assert metadata["listLength"] == str(concurrency), "target backlog per pod: one pod's concurrency"
            assert metadata["activationListLength"] == "0", "any waiting image wakes a region at zero"
            assert metadata["enableTLS"] == "true", "the broker is reached over TLS (rediss://)"
            assert metadata["databaseIndex"] == "0"
            assert set(metadata) == {"listName", "listLength", "activationListLength", "enableTLS", "databaseIndex"}
        # As many pods as the region's services keep busy: ~40 images in flight per FPGA service.
        assert spec["maxReplicaCount"] == math.ceil(len(services) * IMAGES_IN_FLIGHT_PER_SERVICE / concurrency)
        # Zero strands nothing: `blobscore beat` (always running) also sweeps unacknowledged images back.
        assert spec["minReplicaCount"] in (0, 1)
        assert spec["cooldownPeriod"] >= MIN_COOLDOWN_S
        scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert scale_down["stabilizationWindowSeconds"] >= MIN_COOLDOWN_S


def test_each_region_has_a_scrape_target_for_its_workers_metrics() -> None:
    for name, _pod, container, region in worker_deployments():
        objects = rendered(region)
        (deployment,) = [d for d in objects if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
        (service,) = [d for d in objects if d["kind"] == "Service" and d["metadata"]["name"] == name]
        assert service["spec"]["clusterIP"] == "None", "headless: Prometheus scrapes each pod"
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        (port,) = service["spec"]["ports"]
        (container_port,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
        assert port["port"] == container_port["containerPort"] == 9100
        annotations = service["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "9100",
                               "prometheus.io/path": "/metrics"}


def test_the_beat_runs_blobscore_beat_with_two_replicas() -> None:
    beats = [d for d in deployments() if d["spec"]["template"]["spec"]["containers"][0].get("args") == ["beat"]]
    assert len(beats) == 1, "one beat Deployment, the same in every overlay"
    (beat,) = beats
    # Two, always: redbeat's lock lets one fire; the other takes over. The workers' scale-to-zero relies on it.
    assert beat["spec"]["replicas"] == 2
    container = beat["spec"]["template"]["spec"]["containers"][0]
    assert not [n for n in secret_env(container) if not n.startswith("BLOBSCORE_")], "the beat scores nothing"
    assert not [d for d in k8s_objects() if d["kind"] == "ScaledObject" and d["spec"]["scaleTargetRef"]["name"]
                == beat["metadata"]["name"]], "the beat is never scaled"


def test_every_overlay_renders_one_beat_and_one_exporter_for_the_whole_cluster() -> None:
    for region in overlay_regions():
        objects = rendered(region)
        for command in ("beat", "exporter"):
            found = running(objects, command)
            assert [d["metadata"]["name"] for d in found] == [f"blobscore-{command}"], f"overlays/{region}: {command}"
            assert "blobscore/region" not in found[0]["metadata"]["labels"], f"{command} serves every region"
            assert "nodeSelector" not in found[0]["spec"]["template"]["spec"], f"{command} runs on any node"


def test_every_service_selects_the_pods_of_exactly_one_deployment_on_a_port_they_serve() -> None:
    for region in overlay_regions():
        objects = rendered(region)
        for service in (doc for doc in objects if doc["kind"] == "Service"):
            name = service["metadata"]["name"]
            matching = selected_by(service["spec"]["selector"], objects)
            assert [d["metadata"]["name"] for d in matching] == [name], f"overlays/{region}: Service {name}"
            (deployment,) = matching
            assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"], name
            ports = {port["name"]: port["containerPort"]
                     for container in deployment["spec"]["template"]["spec"]["containers"]
                     for port in container.get("ports", [])}
            for port in service["spec"]["ports"]:
                assert ports.get(port["targetPort"]) == port["port"], f"{name}: {port}"


def exporter_container() -> tuple[dict[str, Any], dict[str, Any]]:
    """The exporter's Deployment and its container."""
    (exporter,) = running(k8s_objects(), "exporter")
    (container,) = exporter["spec"]["template"]["spec"]["containers"]
    return exporter, container


def test_the_exporter_is_one_replica_never_two_and_never_scaled() -> None:
    exporter, container = exporter_container()
    assert exporter["spec"]["replicas"] == 1
    # Not a rolling update: for a while two would serve the same series, and a sum() would count them twice.
    assert exporter["spec"]["strategy"] == {"type": "Recreate"}
    assert not [d for d in k8s_objects() if d["kind"] == "ScaledObject"
                and d["spec"]["scaleTargetRef"]["name"] == exporter["metadata"]["name"]]
    resources = container["resources"]
    request = quantity_mib(resources["requests"]["memory"])
    assert request >= MEASURED_EXPORTER_RSS_MIB * 1.2, "request below the measured RSS plus headroom"
    assert quantity_mib(resources["limits"]["memory"]) >= 2 * MEASURED_EXPORTER_RSS_MIB


def test_the_exporters_port_service_scrape_annotations_and_probes_agree() -> None:
    exporter, container = exporter_container()
    params = check_blobscore_argv(blobscore_group(), container["args"])
    assert params["host"] == "0.0.0.0", "it must listen beyond the pod's loopback"
    (port,) = container["ports"]
    assert port["containerPort"] == params["port"]
    # The port prometheus.yml scrapes on compose: one exporter port everywhere.
    assert params["port"] == exporter_target()[1]
    (service,) = [doc for doc in k8s_objects() if doc["kind"] == "Service"
                  and selected_by(doc["spec"]["selector"], [exporter])]
    assert service["metadata"]["name"] == exporter["metadata"]["name"]
    (service_port,) = service["spec"]["ports"]
    assert (service_port["port"], service_port["targetPort"]) == (params["port"], port["name"])
    assert service["metadata"]["annotations"] == {"prometheus.io/scrape": "true",
                                                  "prometheus.io/port": str(params["port"]),
                                                  "prometheus.io/path": "/metrics"}
    # The address a static scrape job uses in the cluster, as the docs give it.
    address = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{params['port']}"
    for doc in (PROMETHEUS_CONFIG, K8S_DIR / "README.md"):
        assert address in doc.read_text("utf-8"), f"{doc.relative_to(ROOT)} does not give {address}"
    # It serves /metrics only; a scrape answers 200 while Redis is down (blobscore_exporter_redis_up 0) and takes up
    # to Redis' socket timeout when Redis hangs: neither may fail a probe.
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/metrics", "port": port["name"]}, probe
        assert container[probe]["timeoutSeconds"] > SOCKET_TIMEOUT_S, probe
        assert container[probe]["periodSeconds"] >= container[probe]["timeoutSeconds"], probe


def test_the_exporter_gets_the_config_and_the_broker_url_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _exporter, container = exporter_container()
    assert set(secret_env(container)) == {"BLOBSCORE_BROKER_URL"}, "no service key, no Blob connection string"
    # What it reads needs no storage account: the ConfigMap pins the namespace, which names every queue and key.
    env = {**literal_env(container), "BLOBSCORE_BROKER_URL": "redis://127.0.0.1:1/0"}  # never connected to here
    settings = settings_from(env, K8S_CONFIG, monkeypatch, tmp_path)
    exporter_registry(settings)  # builds (its key prefix, schedules, clients); connects to nothing
    workers = k8s_settings(monkeypatch, tmp_path)
    assert settings.key_prefix == workers.key_prefix
    exported = {settings.queue_for(service) for service in settings.all_services()}
    consumed = {queue for region in overlay_regions() for queue in queues_to_consume(workers, region)}
    assert consumed <= exported, f"queues no exporter series shows: {sorted(consumed - exported)}"


def test_every_pod_is_unprivileged_with_a_read_only_root_and_bounded_resources() -> None:
    for name, pod, container in k8s_containers():
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                          "seccompProfile": {"type": "RuntimeDefault"}}, name
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                 "capabilities": {"drop": ["ALL"]}}, name
        # The root is read-only: /tmp is an emptyDir of bounded size.
        (tmp,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/tmp"]
        (volume,) = [volume for volume in pod["volumes"] if volume["name"] == tmp["name"]]
        assert "sizeLimit" in volume["emptyDir"], name
        resources = container["resources"]
        assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}, name
        assert quantity_mib(resources["limits"]["memory"]) >= quantity_mib(resources["requests"]["memory"]), name


# --------------------------------------------------------------------------------------------- deploy/azureml


def test_the_fpga_model_table_matches_the_worker_catalog() -> None:
    assert set(fpga.MODELS) == set(PROFILES)
    for name, spec in fpga.MODELS.items():
        assert fpga.output_names(name) == PROFILES[name].outputs, name
        assert spec.sdk_class.startswith("Quantized")
    assert fpga.INPUT_NAME == DEFAULT_INPUT_NAME


def test_edge_output_names_differ_where_documented() -> None:
    assert fpga.output_names("resnet50", edge=True) == ("classifier/resnet_v1_50/predictions/Softmax:0",)
    with pytest.raises(ValueError, match="no documented Edge"):
        fpga.output_names("vgg16", edge=True)
    with pytest.raises(ValueError, match="unknown model"):
        fpga.output_names("inception")


@pytest.mark.parametrize(("given", "expected"), [("eastus", "eastus"), ("East US", "eastus"),
                                                 ("southeastasia", "southeastasia"), ("WestEurope", "westeurope"),
                                                 ("westus2", "westus2")])
def test_fpga_regions_are_accepted(given: str, expected: str) -> None:
    assert fpga.validate_region(given) == expected


@pytest.mark.parametrize("region", ["northeurope", "westus", "local", ""])
def test_other_regions_are_refused(region: str) -> None:
    with pytest.raises(ValueError, match="FPGA regions: eastus, southeastasia, westeurope, westus2"):
        fpga.validate_region(region)


def test_service_and_compute_names_follow_azure_mls_rules() -> None:
    for good in ("abc", "eastus-resnet50", "a" * 32):
        assert fpga.validate_service_name(good) == good
    for bad in ("ab", "a" * 33, "Eastus", "1abc", "abc-", "ab_c"):
        with pytest.raises(ValueError, match="invalid service name"):
            fpga.validate_service_name(bad)
    for region in fpga.FPGA_REGIONS:
        assert fpga.validate_compute_name(fpga.default_compute_name(region))
    for bad in ("a", "a" * 17, "1aks", "aks_1"):
        with pytest.raises(ValueError, match="invalid compute name"):
            fpga.validate_compute_name(bad)


def test_key_variables_and_tensor_names() -> None:
    assert fpga.default_key_env("eastus-resnet50") == "EASTUS_RESNET50_KEY"
    with pytest.raises(ValueError, match="invalid environment variable"):
        fpga.default_key_env("1st")
    assert fpga.sdk_tensor_name("densenet121/predictions/Softmax:densenet121") == "densenet121/predictions/Softmax:0"
    assert fpga.sdk_tensor_name("resnet_v1_152/pool5") == "resnet_v1_152/pool5:0"
    assert fpga.sdk_tensor_name("vgg_16/fc7/Relu:0") == "vgg_16/fc7/Relu:0"
    assert fpga.sdk_tensor_name("x:3") == "x:3"


def test_tls_must_be_chosen_explicitly() -> None:
    assert fpga.tls_choice("blobscore", None, None, None) == "leaf"
    assert fpga.tls_choice(None, "scoring.example.com", Path("c.pem"), Path("k.pem")) == "custom"
    assert fpga.tls_choice(None, None, None, None, no_tls=True) is None
    with pytest.raises(ValueError, match="choose TLS"):
        fpga.tls_choice(None, None, None, None)
    with pytest.raises(ValueError, match="choose one of"):
        fpga.tls_choice("blobscore", None, None, None, no_tls=True)
    with pytest.raises(ValueError, match="needs all of"):
        fpga.tls_choice(None, "scoring.example.com", None, None)
    with pytest.raises(ValueError, match="invalid --leaf-domain-label"):
        fpga.tls_choice("Bad_Label", None, None, None)


@pytest.mark.parametrize(
    ("uri", "ssl", "expected"),
    [
        ("https://svc123abc.eastus.cloudapp.azure.com/", None, ("svc123abc.eastus.cloudapp.azure.com", 443, True)),
        ("http://20.1.2.3:80/api/v1/service/svc/score", None, ("20.1.2.3", 80, False)),
        ("http://20.1.2.3", None, ("20.1.2.3", 80, False)),
        ("https://h.example:8443/x", None, ("h.example", 8443, True)),
        ("20.1.2.3:443", None, ("20.1.2.3", 443, True)),
        ("20.1.2.3:80", None, ("20.1.2.3", 80, False)),
        ("20.1.2.3:50051", True, ("20.1.2.3", 50051, True)),
    ],
)
def test_scoring_uris_give_host_port_and_tls(uri: str, ssl: bool | None, expected: tuple[str, int, bool]) -> None:
    assert fpga.parse_scoring_uri(uri, ssl) == fpga.Endpoint(*expected)


@pytest.mark.parametrize("uri", ["", "ftp://h/", "just-a-host", "https:///path"])
def test_unexpected_scoring_uris_are_refused(uri: str) -> None:
    with pytest.raises(ValueError, match="unexpected scoring URI"):
        fpga.parse_scoring_uri(uri)


def test_an_existing_cluster_must_have_fpga_vms_in_the_region() -> None:
    fpga.check_existing_cluster("fpga-eus", "Standard_PB6s", "eastus", "eastus")
    fpga.check_existing_cluster("fpga-eus", "standard_pb6s", "East US", "eastus")
    with pytest.raises(ValueError, match="not Standard_PB6s"):
        fpga.check_existing_cluster("aks", "Standard_D3_v2", "eastus", "eastus")
    with pytest.raises(ValueError, match="not eastus"):
        fpga.check_existing_cluster("aks", "Standard_PB6s", "westeurope", "eastus")


def entry(**changes: Any) -> fpga.ServiceEntry:
    values: dict[str, Any] = {
        "name": "eastus-resnet50", "region": "eastus", "address": "svc.eastus.cloudapp.azure.com", "port": 443,
        "tls": True, "key_env": "EASTUS_RESNET50_KEY", "route": "eastus-resnet50", "model": "resnet50",
    }
    return fpga.ServiceEntry(**{**values, **changes})


def load_block(block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    path = tmp_path / "blobscore.toml"
    path.write_text(block, "utf-8")
    return settings_from({}, path, monkeypatch, tmp_path)


def test_the_toml_block_is_a_valid_services_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = fpga.toml_block(entry(outputs=fpga.output_names("resnet50")))
    assert "output_names" not in block, "catalog defaults are left out"
    assert "input_name" not in block, "catalog defaults are left out"
    monkeypatch.setenv("EASTUS_RESNET50_KEY", "k")
    service = load_block(block, tmp_path, monkeypatch).services["eastus-resnet50"]
    assert (service.region, service.address, service.port, service.tls) == (
        "eastus", "svc.eastus.cloudapp.azure.com", 443, True)
    assert (service.key_env, service.route, service.model) == ("EASTUS_RESNET50_KEY", "eastus-resnet50", "resnet50")
    assert service.key is not None
    assert service.key.get_secret_value() == "k"


def test_the_toml_block_carries_names_that_differ_from_the_catalog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edge = fpga.output_names("resnet50", edge=True)
    block = fpga.toml_block(entry(name='odd "name"', outputs=edge, input_name="images:0"))
    service = load_block(block, tmp_path, monkeypatch).services['odd "name"']
    assert tuple(service.output_names) == edge
    assert service.input_name == "images:0"
    with pytest.raises(ValueError, match="invalid environment variable"):
        fpga.toml_block(entry(key_env="EASTUS-KEY"))


def test_the_dry_run_prints_the_plan_and_block_without_importing_the_sdk() -> None:
    code = (
        "import json, runpy, sys\n"
        "sys.argv = ['deploy_fpga', '--model', 'ssd_vgg', '--service-name', 'westeurope-ssd', '--region',"
        " 'westeurope', '--leaf-domain-label', 'blobscore', '--dry-run']\n"
        "try:\n"
        "    runpy.run_module('deploy.azureml.deploy_fpga', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('azureml', 'tensorflow'))\n"
        "print(json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False)
    *lines, last = run.stdout.splitlines()
    assert json.loads(last) == {"code": 0, "heavy": []}, run.stderr
    output = "\n".join(lines)
    assert "end of support on 2026-06-30" in run.stderr
    assert "Standard_PB6s in westeurope" in output
    assert "QuantizedSsdVgg" in output
    block = output[output.index("[services.westeurope-ssd]"):output.index("Put the service key")]
    table = tomllib.loads(block)["services"]["westeurope-ssd"]
    assert table["port"] == 443
    assert table["tls"] is True
    assert table["key_env"] == "WESTEUROPE_SSD_KEY"
    assert table["route"] == "westeurope-ssd"
    assert table["model"] == "ssd_vgg"
    assert "output_names" not in table


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "resnet50", "--service-name", "svc-one", "--region", "eastus", "--dry-run"],  # no TLS choice
        ["--model", "resnet50", "--service-name", "svc-one", "--region", "northeurope", "--no-tls"],
        ["--model", "resnet50", "--service-name", "Svc", "--region", "eastus", "--no-tls"],
        ["--model", "resnet50", "--service-name", "svc-one", "--region", "eastus", "--no-tls", "--delete-cluster"],
        ["--model", "resnet50", "--service-name", "svc-one", "--region", "eastus", "--no-tls", "--key-env", "A-B"],
        ["--model", "resnet50", "--service-name", "svc-one", "--region", "eastus", "--no-tls", "--replicas", "0"],
    ],
)
def test_invalid_command_lines_exit_with_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        fpga.parse_args(argv)
    assert raised.value.code == 2
    assert "error:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- SDK signatures

# The SDK calls of deploy_fpga.py, as written there, and where the installed SDK defines them (class, function).
SDK_CALLS: dict[str, tuple[str, str | None, str]] = {
    "Workspace.from_config": ("core/workspace.py", "Workspace", "from_config"),
    "utils.preprocess_array": ("accel/models/utils.py", None, "preprocess_array"),
    "model_graph.import_graph_def": ("accel/models/accel_model.py", "AccelModel", "import_graph_def"),
    "Model.register": ("core/model.py", "Model", "register"),
    "AccelOnnxConverter.convert_tf_model": ("accel/_accel_onnx_converter.py", "AccelOnnxConverter",
                                            "convert_tf_model"),
    "conversion.wait_for_completion": ("_model_converters/model_convert_operation.py", "ModelConvertOperation",
                                       "wait_for_completion"),
    "AccelContainerImage.image_configuration": ("accel/_accel_container_image.py", "AccelContainerImage",
                                                "image_configuration"),
    "Image.create": ("core/image/image.py", "Image", "create"),
    "image.wait_for_creation": ("core/image/image.py", "Image", "wait_for_creation"),
    "Image": ("core/image/image.py", "Image", "__init__"),
    "ComputeTarget": ("core/compute/compute.py", "ComputeTarget", "__init__"),
    "AksCompute.provisioning_configuration": ("core/compute/aks.py", "AksCompute", "provisioning_configuration"),
    "provisioning.enable_ssl": ("core/compute/aks.py", "AksProvisioningConfiguration", "enable_ssl"),
    "ComputeTarget.create": ("core/compute/compute.py", "ComputeTarget", "create"),
    "target.wait_for_completion": ("core/compute/compute.py", "ComputeTarget", "wait_for_completion"),
    "AksWebservice.deploy_configuration": ("core/webservice/aks.py", "AksWebservice", "deploy_configuration"),
    "Webservice.deploy_from_image": ("core/webservice/webservice.py", "Webservice", "deploy_from_image"),
    "service.wait_for_deployment": ("core/webservice/webservice.py", "Webservice", "wait_for_deployment"),
    "Webservice": ("core/webservice/webservice.py", "Webservice", "__init__"),
}


def sdk_root() -> Path:
    """The installed azureml namespace folder, found without importing anything from it."""
    spec = importlib.util.find_spec("azureml")
    assert spec is not None, "azureml-accel-models is not installed"
    assert spec.submodule_search_locations, "azureml is not a package"
    return Path(next(iter(spec.submodule_search_locations)))


def sdk_parameters(relative: str, owner: str | None, function: str) -> set[str]:
    """The parameter names of a function of the installed SDK, read from its source."""
    tree = ast.parse((sdk_root() / relative).read_text("utf-8"))
    scope: list[ast.stmt] = tree.body
    if owner is not None:
        scope = next(node.body for node in tree.body if isinstance(node, ast.ClassDef) and node.name == owner)
    definition = next(node for node in scope if isinstance(node, ast.FunctionDef) and node.name == function)
    arguments = definition.args
    return {arg.arg for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]}


def dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def test_the_sdk_calls_use_keyword_arguments_the_installed_sdk_has() -> None:
    tree = ast.parse(Path(fpga.__file__).read_text("utf-8"))
    seen = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (name := dotted(node.func)) in SDK_CALLS:
            seen.add(name)
            parameters = sdk_parameters(*SDK_CALLS[name])
            keywords = {keyword.arg for keyword in node.keywords if keyword.arg}
            assert keywords <= parameters, f"{name}: {sorted(keywords - parameters)} not in the SDK's {parameters}"
    assert seen == set(SDK_CALLS), f"not called any more: {sorted(set(SDK_CALLS) - seen)}"


def test_the_quantized_model_classes_exist_and_take_is_frozen() -> None:
    exported = (sdk_root() / "accel" / "models" / "__init__.py").read_text("utf-8")
    for spec in fpga.MODELS.values():
        assert f'"{spec.sdk_class}"' in exported, spec.sdk_class
        module = {"resnet50": "_resnet50", "resnet152": "_resnet152", "densenet121": "_densenet121",
                  "vgg16": "_vgg16", "ssd_vgg": "_ssdvgg"}[spec.profile]
        assert "is_frozen" in sdk_parameters(f"accel/models/{module}.py", spec.sdk_class, "__init__")
