"""Deploy a model to the Azure ML FPGA service ("hardware-accelerated models") and print its blobscore.toml entry.

    python -m deploy.azureml.deploy_fpga --model resnet50 --service-name eastus-resnet50 --region eastus --dry-run

END OF SUPPORT: this uses the Azure ML SDK v1 (azureml-core, azureml-accel-models), which reached its end of support
on 2026-06-30. It still installs and its code paths are the ones Microsoft documented, but Microsoft no longer fixes
it and the service side may refuse it at any time. blobscore's worker does not depend on any of it: it speaks the
TensorFlow Serving Predict protocol over gRPC and works the same with TF Serving or OpenVINO Model Server.

Microsoft's documented flow, step by step: load the workspace from its config file; build the TensorFlow graph (a
`tf.placeholder(tf.string)` of JPEG bytes, `utils.preprocess_array`, the quantized model class from
`azureml.accel.models`, its default classifier); save it; `Model.register`; `AccelOnnxConverter.convert_tf_model`;
an `AccelContainerImage` (`Image.create`); an AKS cluster of Standard_PB6s VMs in an FPGA region; the web service
(`AksWebservice.deploy_configuration`, `Webservice.deploy_from_image`). Then it prints the scoring host, port,
service name, input and output tensor names and a `[services.NAME]` table for blobscore.toml whose key comes from a
named environment variable: the key itself is never printed.

`Model.deploy` with an `AccelInferenceConfig` is not used: in azureml-core 1.61 it fails before contacting Azure
(`convert_parts_to_environment` reads `inference_config.environment`, which `AccelInferenceConfig` lacks); see
deploy/azureml/README.md.

Everything that needs the SDK or TensorFlow is imported inside functions, so this module imports without them and
`--dry-run` prints the plan and the TOML table without touching Azure. Nothing here could be run against Azure where
it was written (no subscription, no FPGA quota): the pure parts are unit-tested, the SDK calls' keyword arguments
are checked against the installed SDK's source.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from worker.models.catalog import DEFAULT_INPUT_NAME, get_profile

SDK_END_OF_SUPPORT = "2026-06-30"
FPGA_VM_SIZE = "Standard_PB6s"
# The regions with Standard_PB6s VMs (Microsoft's documentation of the FPGA service).
FPGA_REGIONS: tuple[str, ...] = ("eastus", "southeastasia", "westeurope", "westus2")
# Short forms for compute names, which Azure ML limits to 16 characters.
REGION_ABBREVIATIONS: dict[str, str] = {"eastus": "eus", "southeastasia": "sea", "westeurope": "weu", "westus2": "wus2"}
# `tf.placeholder(tf.string)` in a fresh graph.
INPUT_NAME = "Placeholder:0"
DEFAULT_MODELS_DIR = Path.home() / ".cache" / "blobscore" / "azureml-models"
DRY_RUN_HOST = "<scoring host: known after deployment>"

@dataclass(frozen=True)
class Preprocessing:
    """Arguments of `azureml.accel.models.utils.preprocess_array` for one model."""

    output_height: int = 224
    output_width: int = 224
    preserve_aspect_ratio: bool = True
    scaling_factor: float = 1.0
    order: str = "RGB"

    def describe(self) -> str:
        """One line for the plan."""
        aspect = "keep aspect, centre crop" if self.preserve_aspect_ratio else "stretch"
        scale = f", x{self.scaling_factor:g}" if self.scaling_factor != 1.0 else ""
        return f"{self.output_height}x{self.output_width} {self.order} ({aspect}{scale})"


@dataclass(frozen=True)
class AccelModelSpec:
    """One FPGA model: its SDK class, how its input is prepared and the tensors the service returns."""

    profile: str
    sdk_class: str
    # The output tensor names of the cloud (AKS) service with the default classifier: the worker's catalog.
    outputs: tuple[str, ...]
    default_classifier: bool
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    # The names the Azure Stack Edge (Data Box Edge) sample serves, where documented.
    edge_outputs: tuple[str, ...] | None = None


MODELS: dict[str, AccelModelSpec] = {
    spec.profile: spec
    for spec in (
        AccelModelSpec(
            "resnet50", "QuantizedResnet50", get_profile("resnet50").outputs, True,
            edge_outputs=("classifier/resnet_v1_50/predictions/Softmax:0",),
        ),
        AccelModelSpec("resnet152", "QuantizedResnet152", get_profile("resnet152").outputs, True),
        # The SDK's class documents RGB input with a scaling factor of 0.017.
        AccelModelSpec(
            "densenet121", "QuantizedDensenet121", get_profile("densenet121").outputs, True,
            Preprocessing(scaling_factor=0.017),
        ),
        AccelModelSpec("vgg16", "QuantizedVgg16", get_profile("vgg16").outputs, True),
        # No classifier: the 12 SSD tensors (class logits, then box offsets) are the outputs.
        AccelModelSpec(
            "ssd_vgg", "QuantizedSsdVgg", get_profile("ssd_vgg").outputs, False,
            Preprocessing(output_height=300, output_width=300, preserve_aspect_ratio=False),
        ),
    )
}


# --------------------------------------------------------------------------------------------- pure parts


def accel_model(name: str) -> AccelModelSpec:
    """The FPGA model called `name` (a blobscore model profile), or ValueError listing the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


def output_names(model: str, *, edge: bool = False) -> tuple[str, ...]:
    """The output tensor names of `model`'s service: the cloud (AKS) deployment's, or the Edge sample's."""
    spec = accel_model(model)
    if not edge:
        return spec.outputs
    if spec.edge_outputs is None:
        raise ValueError(f"no documented Edge output names for {model}; read them from your Edge deployment")
    return spec.edge_outputs


def validate_region(region: str) -> str:
    """The region, normalized, if it has FPGA VMs; ValueError otherwise."""
    normalized = region.strip().lower().replace(" ", "")
    if normalized not in FPGA_REGIONS:
        raise ValueError(f"{region!r} has no {FPGA_VM_SIZE} VMs; FPGA regions: {', '.join(FPGA_REGIONS)}")
    return normalized


def validate_service_name(name: str) -> str:
    """An Azure ML web service name: 3-32 lowercase letters, digits and dashes, a letter first, no dash last."""
    if not (3 <= len(name) <= 32 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)):
        raise ValueError(
            f"invalid service name {name!r}: 3 to 32 lowercase letters, digits or dashes, starting with a letter "
            "and not ending with a dash"
        )
    return name


def validate_compute_name(name: str) -> str:
    """An Azure ML compute name: 2-16 letters, digits and dashes, a letter first."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{1,15}", name):
        raise ValueError(f"invalid compute name {name!r}: 2 to 16 letters, digits or dashes, starting with a letter")
    return name


def default_compute_name(region: str) -> str:
    """`fpga-<region abbreviation>`, e.g. fpga-eus (compute names are limited to 16 characters)."""
    return f"fpga-{REGION_ABBREVIATIONS[validate_region(region)]}"


def default_key_env(service: str) -> str:
    """The variable holding a service's key: EASTUS_RESNET50_KEY for eastus-resnet50."""
    return validate_env_name(re.sub(r"[^A-Z0-9]", "_", service.upper()) + "_KEY")


def validate_env_name(name: str) -> str:
    """A portable environment variable name (what a Kubernetes Secret key or an env_file line can carry)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"invalid environment variable name {name!r}")
    return name


def sdk_tensor_name(name: str) -> str:
    """A tensor name with a numeric output index.

    azureml-accel-models 1.62 spells DenseNet-121's classifier tensors `...:densenet121` (the model prefix where
    the output index belongs), which TensorFlow's `import_graph_def` rejects, and ResNet-152's classifier input
    without an index (which TensorFlow reads as output 0). Both are meant as output 0. Names already ending in
    `:<digits>` are returned unchanged.
    """
    op, sep, index = name.rpartition(":")
    if sep and index.isdigit():
        return name
    return f"{op if sep else name}:0"


def tls_choice(
    leaf_domain_label: str | None,
    ssl_cname: str | None,
    ssl_cert: Path | None,
    ssl_key: Path | None,
    no_tls: bool = False,
) -> str | None:
    """Which TLS setup the cluster gets: 'leaf' (a Microsoft certificate), 'custom' (your own) or None.

    None (plain HTTP/2, port 80) only when asked for with `no_tls`: the worker sends the service key as a Bearer
    token on every call, readable by anyone on the path without TLS.
    """
    custom = (ssl_cname, ssl_cert, ssl_key)
    chosen = [name for name, given in (("--leaf-domain-label", leaf_domain_label is not None),
                                       ("a custom certificate", any(part is not None for part in custom)),
                                       ("--no-tls", no_tls)) if given]
    if len(chosen) > 1:
        raise ValueError(f"choose one of {' and '.join(chosen)}")
    if not chosen:
        raise ValueError("choose TLS: --leaf-domain-label LABEL (a Microsoft certificate), --ssl-cname/--ssl-cert/"
                         "--ssl-key (yours), or --no-tls (the key then travels in clear text)")
    if any(part is not None for part in custom):
        if not all(part is not None for part in custom):
            raise ValueError("a custom certificate needs all of --ssl-cname, --ssl-cert and --ssl-key")
        return "custom"
    if leaf_domain_label is not None:
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,61}[a-z0-9]", leaf_domain_label):
            raise ValueError(f"invalid --leaf-domain-label {leaf_domain_label!r}: lowercase letters, digits, dashes")
        return "leaf"
    return None


@dataclass(frozen=True)
class Endpoint:
    """Where the worker reaches the service."""

    host: str
    port: int
    tls: bool


def parse_scoring_uri(uri: str, ssl: bool | None = None) -> Endpoint:
    """Host, port and TLS from a web service's `scoring_uri`.

    An AKS service's URI has a scheme (`https://host/...`: port 443, `http://`: port 80, unless the URI names
    one); the SDK's generic service object for accelerated images gives `ip:port` with TLS in its `ssl` field.
    """
    text = uri.strip()
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unexpected scoring URI {uri!r}")
        tls = parts.scheme == "https"
        return Endpoint(parts.hostname, parts.port or (443 if tls else 80), tls)
    host, sep, port = text.strip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"unexpected scoring URI {uri!r}: expected scheme://host[:port] or host:port")
    number = int(port)
    return Endpoint(host.strip("[]"), number, ssl if ssl is not None else number == 443)


def check_existing_cluster(name: str, vm_size: str | None, location: str | None, region: str) -> None:
    """Refuse to deploy to an existing compute target that has no FPGA VMs or lives in another region."""
    if (vm_size or "").lower() != FPGA_VM_SIZE.lower():
        raise ValueError(f"compute {name!r} runs {vm_size!r} VMs, not {FPGA_VM_SIZE}: choose another --compute-name")
    if location is not None and location.replace(" ", "").lower() != region:
        raise ValueError(f"compute {name!r} is in {location!r}, not {region}: choose another --compute-name")


@dataclass(frozen=True)
class ServiceEntry:
    """One `[services.NAME]` table of blobscore.toml."""

    name: str
    region: str
    address: str
    port: int
    tls: bool
    key_env: str
    route: str
    model: str
    input_name: str = INPUT_NAME
    outputs: tuple[str, ...] = ()


def _toml_string(value: str) -> str:
    # A JSON string (ASCII, escaped) is a valid TOML basic string.
    return json.dumps(value)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def toml_block(entry: ServiceEntry) -> str:
    """The `[services.NAME]` table for blobscore.toml: the key's variable, never the key.

    `input_name` and `output_names` are written only where they differ from what the worker's model catalog
    expects, so the table stays valid when the catalog is right and says so when it is not.
    """
    validate_env_name(entry.key_env)
    lines = [
        f"[services.{_toml_key(entry.name)}]",
        f"region = {_toml_string(entry.region)}",
        f"address = {_toml_string(entry.address)}",
        f"port = {entry.port}",
        f"tls = {'true' if entry.tls else 'false'}",
        f"key_env = {_toml_string(entry.key_env)}",
        f"route = {_toml_string(entry.route)}",
        f"model = {_toml_string(entry.model)}",
    ]
    if entry.input_name != DEFAULT_INPUT_NAME:
        lines.append(f"input_name = {_toml_string(entry.input_name)}")
    if entry.outputs and tuple(entry.outputs) != get_profile(entry.model).outputs:
        lines.append(f"output_names = [{', '.join(_toml_string(name) for name in entry.outputs)}]")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class DeployOptions:
    """What the command line asked for, validated."""

    model: str
    service_name: str
    region: str
    compute_name: str
    agent_count: int = 1
    replicas: int = 1
    tls: str | None = None
    leaf_domain_label: str | None = None
    ssl_cname: str | None = None
    ssl_cert: Path | None = None
    ssl_key: Path | None = None
    workspace_config: Path | None = None
    models_dir: Path = DEFAULT_MODELS_DIR
    blobscore_name: str | None = None
    key_env: str | None = None
    dry_run: bool = False
    teardown: bool = False
    delete_cluster: bool = False

    @property
    def spec(self) -> AccelModelSpec:
        """The model's table entry."""
        return accel_model(self.model)

    @property
    def registered_name(self) -> str:
        """The name the TensorFlow model is registered under."""
        return f"blobscore-{self.model.replace('_', '-')}"

    @property
    def image_name(self) -> str:
        """The accelerated container image, named after the service (lowercase, like the service)."""
        return self.service_name

    @property
    def table_name(self) -> str:
        """The blobscore service name (the `[services.NAME]` table)."""
        return self.blobscore_name or self.service_name

    @property
    def key_variable(self) -> str:
        """The environment variable the worker reads the key from."""
        return self.key_env or default_key_env(self.table_name)

    def entry(self, endpoint: Endpoint, outputs: Sequence[str], input_name: str = INPUT_NAME) -> ServiceEntry:
        """The blobscore.toml table for a service reachable at `endpoint`."""
        return ServiceEntry(
            name=self.table_name, region=self.region, address=endpoint.host, port=endpoint.port, tls=endpoint.tls,
            key_env=self.key_variable, route=self.service_name, model=self.model, input_name=input_name,
            outputs=tuple(outputs),
        )


def planned_endpoint(options: DeployOptions) -> Endpoint:
    """The endpoint as far as it is known before deploying: the port follows from TLS, the host does not."""
    return Endpoint(DRY_RUN_HOST, 443 if options.tls else 80, options.tls is not None)


def plan_lines(options: DeployOptions) -> list[str]:
    """The steps a deployment takes, for --dry-run and for the log of a real run."""
    spec = options.spec
    outputs = ", ".join(spec.outputs)
    head = "default ImageNet classifier" if spec.default_classifier else "no classifier (the 12 SSD tensors)"
    tls = {
        "leaf": f"TLS with a Microsoft certificate for {options.leaf_domain_label}*.{options.region}"
                ".cloudapp.azure.com",
        "custom": f"TLS with your certificate for {options.ssl_cname}",
        None: "NO TLS (--no-tls): the key travels in clear text",
    }[options.tls]
    return [
        f"1. Workspace.from_config({options.workspace_config or 'config.json found from the current directory'})",
        f"2. TensorFlow graph: tf.placeholder(tf.string) -> preprocess_array {spec.preprocessing.describe()} -> "
        f"{spec.sdk_class} (is_frozen) -> {head}",
        f"3. tf.saved_model.simple_save under {options.models_dir / 'saved'}",
        f"4. Model.register as {options.registered_name}",
        f"5. AccelOnnxConverter.convert_tf_model: input {INPUT_NAME}, outputs {outputs}",
        f"6. AccelContainerImage: Image.create {options.image_name}",
        f"7. AKS compute {options.compute_name}: {options.agent_count} x {FPGA_VM_SIZE} in {options.region} "
        f"(reused if it exists; creating one takes about 15 minutes); {tls}",
        f"8. Webservice.deploy_from_image {options.service_name}: AksWebservice.deploy_configuration(autoscale off, "
        f"{options.replicas} replica(s), key authentication on)",
    ]


def report_lines(
    options: DeployOptions, endpoint: Endpoint, outputs: Sequence[str], input_name: str = INPUT_NAME
) -> list[str]:
    """What the worker needs to know, and the blobscore.toml table (the key's variable name only)."""
    entry = options.entry(endpoint, outputs, input_name)
    return [
        f"scoring host:   {endpoint.host}",
        f"port:           {endpoint.port} ({'TLS' if endpoint.tls else 'no TLS'})",
        f"service name:   {options.service_name} (x-ms-aml-grpc-service-route: /api/v1/service/{options.service_name})",
        f"input tensor:   {input_name}",
        f"output tensors: {', '.join(outputs)}",
        "",
        f"blobscore.toml (the key comes from ${entry.key_env}; it is never printed here):",
        "",
        toml_block(entry),
        f"Put the service key in {entry.key_env} without echoing it, e.g.",
        f"  export {entry.key_env}=\"$(python -c 'from azureml.core import Workspace, Webservice; "
        f"print(Webservice(Workspace.from_config(), \"{options.service_name}\").get_keys()[0])')\"",
    ]


def parse_args(argv: Sequence[str] | None = None) -> DeployOptions:
    """The command line, validated (argparse exits with status 2 on an invalid one)."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.azureml.deploy_fpga",
        description="Deploy a model to the Azure ML FPGA service and print its blobscore.toml entry. Azure ML SDK "
        f"v1: END OF SUPPORT {SDK_END_OF_SUPPORT} (see deploy/azureml/README.md).",
    )
    parser.add_argument("--model", required=True, choices=list(MODELS), help="The FPGA model (a blobscore profile).")
    parser.add_argument("--service-name", required=True, help="Azure ML web service name (3-32, lowercase).")
    parser.add_argument("--region", required=True, help=f"FPGA region: {', '.join(FPGA_REGIONS)}.")
    parser.add_argument("--compute-name", help="AKS compute target name (default fpga-<region abbreviation>).")
    parser.add_argument("--agent-count", type=int, default=1, help=f"{FPGA_VM_SIZE} VMs in a new cluster.")
    parser.add_argument("--replicas", type=int, default=1, help="Service replicas (autoscaling stays off).")
    parser.add_argument("--leaf-domain-label", help="TLS with a Microsoft certificate for LABEL*.<region>....")
    parser.add_argument("--ssl-cname", help="TLS with your certificate: its DNS name ...")
    parser.add_argument("--ssl-cert", type=Path, help="... its PEM certificate ...")
    parser.add_argument("--ssl-key", type=Path, help="... and its PEM key.")
    parser.add_argument("--no-tls", action="store_true", help="Plain HTTP/2 on port 80 (the key in clear text).")
    parser.add_argument("--workspace-config", type=Path, help="The workspace's config.json (default: searched).")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help="Model download cache.")
    parser.add_argument("--blobscore-name", help="The [services.NAME] table name (default: the service name).")
    parser.add_argument("--key-env", help="Variable the worker reads the key from (default NAME_KEY, uppercase).")
    parser.add_argument("--dry-run", action="store_true", help="Print the plan and the TOML table; no Azure call.")
    parser.add_argument("--teardown", action="store_true", help="Delete the service and its image instead.")
    parser.add_argument("--delete-cluster", action="store_true", help="With --teardown: also delete the cluster.")
    args = parser.parse_args(argv)
    try:
        region = validate_region(args.region)
        options = DeployOptions(
            model=args.model, service_name=validate_service_name(args.service_name), region=region,
            compute_name=validate_compute_name(args.compute_name or default_compute_name(region)),
            agent_count=_positive(args.agent_count, "--agent-count"), replicas=_positive(args.replicas, "--replicas"),
            tls=None if args.teardown else tls_choice(
                args.leaf_domain_label, args.ssl_cname, args.ssl_cert, args.ssl_key, args.no_tls),
            leaf_domain_label=args.leaf_domain_label, ssl_cname=args.ssl_cname, ssl_cert=args.ssl_cert,
            ssl_key=args.ssl_key, workspace_config=args.workspace_config, models_dir=args.models_dir,
            blobscore_name=args.blobscore_name,
            key_env=validate_env_name(args.key_env) if args.key_env else None, dry_run=args.dry_run,
            teardown=args.teardown, delete_cluster=args.delete_cluster,
        )
        # The table must render: a derived key variable (from --blobscore-name) must be a valid name too.
        toml_block(options.entry(planned_endpoint(options), options.spec.outputs))
    except ValueError as exc:
        parser.error(str(exc))
    if options.delete_cluster and not options.teardown:
        parser.error("--delete-cluster goes with --teardown")
    return options


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise ValueError(f"{flag} must be at least 1")
    return value


# --------------------------------------------------------------------------------------------- Azure ML SDK v1


class DeploymentError(RuntimeError):
    """An Azure step did not succeed."""


@dataclass(frozen=True)
class SavedGraph:
    """The saved TensorFlow model and the tensor names its service will use."""

    path: Path
    input_name: str
    outputs: tuple[str, ...]


def _ensure_pkg_resources() -> None:
    """azureml.accel imports pkg_resources (gone from setuptools >= 81) for `resource_string` only."""
    try:
        importlib.import_module("pkg_resources")
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        def resource_string(module: str, name: str) -> bytes:
            module_file = sys.modules[module].__file__
            if module_file is None:
                raise FileNotFoundError(name)
            return (Path(module_file).parent / name).read_bytes()

        shim.resource_string = resource_string  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim


def load_workspace(config: Path | None) -> Any:
    """The Azure ML workspace from its config.json (interactive or CLI login, as azureml-core decides)."""
    from azureml.core import Workspace

    workspace = Workspace.from_config(path=str(config) if config else None)
    print(f"workspace {workspace.name} ({workspace.resource_group}, {workspace.location})", file=sys.stderr)
    return workspace


def build_graph(spec: AccelModelSpec, models_dir: Path) -> SavedGraph:
    """Build and save preprocessing + quantized model (+ default classifier): Microsoft's documented graph."""
    _ensure_pkg_resources()
    tf: Any = importlib.import_module("tensorflow.compat.v1")
    tf.disable_eager_execution()  # the SDK builds TF1 graphs (tf.compat.v1 under TensorFlow 2)
    utils: Any = importlib.import_module("azureml.accel.models.utils")
    accel_models: Any = importlib.import_module("azureml.accel.models")
    tf.reset_default_graph()
    in_images = tf.placeholder(tf.string)
    prep = spec.preprocessing
    image_tensors = utils.preprocess_array(
        in_images, order=prep.order, scaling_factor=prep.scaling_factor, output_height=prep.output_height,
        output_width=prep.output_width, preserve_aspect_ratio=prep.preserve_aspect_ratio,
    )
    model_graph = getattr(accel_models, spec.sdk_class)(str(models_dir), is_frozen=True)
    features = model_graph.import_graph_def(image_tensors, is_training=False)
    if spec.default_classifier:
        model_graph.classifier_input = sdk_tensor_name(model_graph.classifier_input)
        model_graph.classifier_output = sdk_tensor_name(model_graph.classifier_output)
        outputs = [model_graph.get_default_classifier(features)]
    else:
        outputs = list(features)
    save_path = models_dir / "saved" / f"{spec.profile}-{time.strftime('%Y%m%dT%H%M%S')}"
    with tf.Session() as session:
        model_graph.restore_weights(session)
        tf.saved_model.simple_save(
            session, str(save_path), inputs={"images": in_images},
            outputs={f"output_{index}": tensor for index, tensor in enumerate(outputs)},
        )
    saved = SavedGraph(save_path, in_images.name, tuple(tensor.name for tensor in outputs))
    if saved.outputs != spec.outputs:
        print(f"note: the graph names its outputs {list(saved.outputs)}, not the documented {list(spec.outputs)}; "
              "the TOML table below carries the real names", file=sys.stderr)
    return saved


def register_and_convert(workspace: Any, saved: SavedGraph, name: str) -> Any:
    """Register the saved model and convert it to the FPGA's AccelOnnx flavor; the converted model."""
    _ensure_pkg_resources()
    from azureml.accel import AccelOnnxConverter
    from azureml.core.model import Model

    registered = Model.register(workspace=workspace, model_path=str(saved.path), model_name=name)
    print(f"registered {registered.name} version {registered.version}", file=sys.stderr)
    # Several outputs go as one comma-separated string (the SDK's SSD-VGG sample: a list fails).
    conversion = AccelOnnxConverter.convert_tf_model(
        workspace=workspace, source_model=registered, input_node=saved.input_name,
        outputs_nodes=",".join(saved.outputs),
    )
    conversion.wait_for_completion(show_output=True)
    converted = conversion.result
    print(f"converted: {converted.name} version {converted.version}", file=sys.stderr)
    return converted


def create_image(workspace: Any, name: str, converted: Any, description: str) -> Any:
    """The accelerated container image holding the converted model."""
    _ensure_pkg_resources()
    from azureml.accel import AccelContainerImage
    from azureml.core.image import Image

    image_config = AccelContainerImage.image_configuration(description=description)
    image = Image.create(workspace=workspace, name=name, models=[converted], image_config=image_config)
    image.wait_for_creation(show_output=True)
    if image.creation_state != "Succeeded":
        raise DeploymentError(f"image {name}: {image.creation_state}; build log {image.image_build_log_uri}")
    return image


def ensure_cluster(workspace: Any, options: DeployOptions) -> Any:
    """The AKS compute target: the existing one (checked: PB6s VMs in the region) or a new one."""
    from azureml.core.compute import AksCompute, ComputeTarget
    from azureml.exceptions import ComputeTargetException

    try:
        existing = ComputeTarget(workspace=workspace, name=options.compute_name)
    except ComputeTargetException:
        existing = None
    if existing is not None:
        if not isinstance(existing, AksCompute):
            raise DeploymentError(f"compute {options.compute_name} exists and is not an AKS cluster")
        check_existing_cluster(options.compute_name, existing.agent_vm_size, existing.cluster_location,
                               options.region)
        print(f"reusing AKS compute {options.compute_name}", file=sys.stderr)
        return existing
    provisioning = AksCompute.provisioning_configuration(
        vm_size=FPGA_VM_SIZE, agent_count=options.agent_count, location=options.region,
    )
    if options.tls == "leaf":
        provisioning.enable_ssl(leaf_domain_label=options.leaf_domain_label)
    elif options.tls == "custom":
        provisioning.enable_ssl(ssl_cname=options.ssl_cname, ssl_cert_pem_file=str(options.ssl_cert),
                                ssl_key_pem_file=str(options.ssl_key))
    target = ComputeTarget.create(workspace=workspace, name=options.compute_name,
                                  provisioning_configuration=provisioning)
    target.wait_for_completion(show_output=True)
    if target.provisioning_state != "Succeeded":
        raise DeploymentError(f"AKS compute {options.compute_name}: {target.provisioning_state} "
                              f"{target.provisioning_errors}")
    return target


def deploy_service(workspace: Any, options: DeployOptions, image: Any, target: Any) -> Any:
    """The web service on the cluster, key authentication on, a fixed number of replicas."""
    from azureml.core.webservice import AksWebservice, Webservice

    deployment_config = AksWebservice.deploy_configuration(
        autoscale_enabled=False, num_replicas=options.replicas, auth_enabled=True,
    )
    service = Webservice.deploy_from_image(
        workspace=workspace, name=options.service_name, image=image, deployment_config=deployment_config,
        deployment_target=target,
    )
    service.wait_for_deployment(show_output=True)
    if service.state != "Healthy":
        raise DeploymentError(f"service {options.service_name}: {service.state}")
    return service


def teardown(workspace: Any, options: DeployOptions) -> None:
    """Delete the service and its image (and, if asked, the cluster, which is what costs money by the hour)."""
    from azureml.core.compute import ComputeTarget
    from azureml.core.image import Image
    from azureml.core.webservice import Webservice
    from azureml.exceptions import ComputeTargetException, WebserviceException

    # The service first: the image cannot be deleted while a service uses it.
    try:
        Webservice(workspace=workspace, name=options.service_name).delete()
        print(f"deleted web service {options.service_name}", file=sys.stderr)
    except WebserviceException as exc:
        print(f"web service {options.service_name}: {exc}", file=sys.stderr)
    try:
        Image(workspace=workspace, name=options.image_name).delete()
        print(f"deleted image {options.image_name}", file=sys.stderr)
    except WebserviceException as exc:
        print(f"image {options.image_name}: {exc}", file=sys.stderr)
    if options.delete_cluster:
        try:
            ComputeTarget(workspace=workspace, name=options.compute_name).delete()
            print(f"deleting AKS compute {options.compute_name} (takes a few minutes)", file=sys.stderr)
        except ComputeTargetException as exc:
            print(f"compute {options.compute_name}: {exc}", file=sys.stderr)


def deploy(options: DeployOptions) -> list[str]:
    """Run the whole flow against Azure; the report lines."""
    workspace = load_workspace(options.workspace_config)
    saved = build_graph(options.spec, options.models_dir)
    converted = register_and_convert(workspace, saved, options.registered_name)
    image = create_image(workspace, options.image_name, converted, f"blobscore {options.model} on FPGA")
    target = ensure_cluster(workspace, options)
    service = deploy_service(workspace, options, image, target)
    endpoint = parse_scoring_uri(service.scoring_uri, getattr(service, "ssl", None))
    return report_lines(options, endpoint, saved.outputs, saved.input_name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m deploy.azureml.deploy_fpga`."""
    options = parse_args(argv)
    print(f"WARNING: Azure ML SDK v1 (azureml-core, azureml-accel-models) reached its end of support on "
          f"{SDK_END_OF_SUPPORT}. Standard_PB6s VMs are billed by the hour while the cluster exists.",
          file=sys.stderr)
    if options.dry_run:
        action = "teardown" if options.teardown else "deployment"
        print(f"Plan ({action} dry run: Azure is not contacted, nothing is created or deleted):")
        if options.teardown:
            extra = f" and AKS compute {options.compute_name}" if options.delete_cluster else ""
            print(f"  delete web service {options.service_name}, image {options.image_name}{extra}")
            return 0
        print("\n".join(f"  {line}" for line in plan_lines(options)))
        print()
        print("\n".join(report_lines(options, planned_endpoint(options), options.spec.outputs)))
        return 0
    with warnings.catch_warnings():
        # The SDK warns about its own deprecation on every call; the banner above says it once.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            if options.teardown:
                teardown(load_workspace(options.workspace_config), options)
                return 0
            lines = deploy(options)
        except (DeploymentError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
