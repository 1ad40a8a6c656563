"""Command line of the stand-in scoring server (`blobscore standin`, `python -m deploy.standin`)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from deploy.standin.faults import FaultPlan, parse_status_code
from deploy.standin.profiles import (
    EmulatedSource,
    OutputSource,
    ReplayFileError,
    ReplaySource,
    load_classifier_source,
    load_replay,
)
from deploy.standin.server import ServerStartError, StandinConfig, TlsFiles, start_server
from worker.models.catalog import ModelProfile, OutputKind, get_profile

logger = logging.getLogger("deploy.standin")

KEY_ENV_VAR = "BLOBSCORE_STANDIN_KEY"

HELP = """Serve tensorflow.serving.PredictionService (Predict, GetModelMetadata) and gRPC health the way the
Azure ML FPGA service does, with a real CPU model (EfficientNet-Lite0) behind the resnet50, resnet152,
densenet121 and vgg16 (logits) profiles. The ssd_vgg profile only replays tensors from --replay: no real
SSD-VGG weights are available offline. Prints `listening on HOST:PORT` once ready; stops on SIGTERM/SIGINT."""

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
# How `blobscore --help` lists this app as `blobscore standin` (entry point blobscore.commands, pyproject.toml).
COMMAND_HELP = "The local stand-in scoring service (real CPU model)."


@app.callback(invoke_without_command=True, help=HELP)
def serve(
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 picks a free one.")] = 8500,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    model: Annotated[str, typer.Option(help="Profile: resnet50, resnet152, densenet121, vgg16, ssd_vgg.")] = (
        "resnet50"
    ),
    key: Annotated[
        str | None,
        typer.Option(
            envvar=KEY_ENV_VAR,
            show_default=False,
            help=f"Require `authorization: Bearer KEY`. Prefer the {KEY_ENV_VAR} variable (not in ps output).",
        ),
    ] = None,
    service_name: Annotated[
        str | None, typer.Option(help="Require `x-ms-aml-grpc-service-route: /api/v1/service/NAME`.")
    ] = None,
    input_name: Annotated[
        str | None, typer.Option(help="The input tensor's name; without it any single input is accepted.")
    ] = None,
    output_name: Annotated[
        list[str] | None,
        typer.Option(help="Override the profile's output tensor names, in order (repeat for several)."),
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="PEM certificate.")] = None,
    tls_key: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="PEM private key.")] = None,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads of the model.")] = 1,
    workers: Annotated[int, typer.Option(min=1, help="Concurrent gRPC calls served.")] = 8,
    cache_dir: Annotated[Path | None, typer.Option(help="Where the converted ONNX model is cached.")] = None,
    no_model: Annotated[
        bool, typer.Option("--no-model", help="Benchmarks only: fake, hash-derived scores, no real model.")
    ] = False,
    emulate_latency_ms: Annotated[
        float, typer.Option(min=0, help="With --no-model (or ssd_vgg): answer after this many ms.")
    ] = 0.0,
    replay: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="ssd_vgg only: .npz of the 12 SSD-VGG output tensors keyed by tensor name, returned for every "
            "image (no real SSD weights are available offline).",
        ),
    ] = None,
    fail_rate: Annotated[float, typer.Option(min=0, max=1, help="Fault: fraction of calls to fail.")] = 0.0,
    fail_code: Annotated[str, typer.Option(help="Fault: status code of failed calls.")] = "UNAVAILABLE",
    delay_ms: Annotated[float, typer.Option(min=0, help="Fault: extra delay before every answer.")] = 0.0,
    hang_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Fault: fraction of calls never answered (until the deadline).")
    ] = 0.0,
    fault_seed: Annotated[int | None, typer.Option(help="Seed for reproducible fault decisions.")] = None,
    stats_file: Annotated[
        Path | None, typer.Option(help="Rewrite Predict call counts (JSON) to this file after every call.")
    ] = None,
    grace_s: Annotated[float, typer.Option(min=0, help="Seconds in-flight calls get at shutdown.")] = 2.0,
    log_level: Annotated[str, typer.Option(help="Python logging level.")] = "INFO",
) -> None:
    """Run the stand-in scoring server until SIGTERM or SIGINT."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    profile = _profile(model, output_name)
    faults = _faults(fail_rate, fail_code, delay_ms, hang_rate)
    tls = _tls(tls_cert, tls_key)
    source = _source(profile, no_model, emulate_latency_ms, replay, cache_dir, threads)
    config = StandinConfig(
        profile, input_name or None, key or None, service_name or None, faults, fault_seed, stats_file
    )
    _warn_if_not_real(source, profile, faults)
    try:
        running = start_server(config, source, host=host, port=port, tls=tls, workers=workers)
    except ServerStartError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    print(f"listening on {host}:{running.port}", flush=True)
    logger.info("serving %s (outputs %s)%s", profile.name, ", ".join(profile.outputs), " over TLS" if tls else "")
    _wait_for_stop_signal()
    logger.info("stopping (grace %.1f s)", grace_s)
    running.stop(grace_s)


def _profile(model: str, output_names: list[str] | None) -> ModelProfile:
    try:
        return get_profile(model).with_outputs(tuple(output_names) if output_names else None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _faults(fail_rate: float, fail_code: str, delay_ms: float, hang_rate: float) -> FaultPlan:
    try:
        return FaultPlan(fail_rate, parse_status_code(fail_code), delay_ms, hang_rate)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="fault options") from exc


def _tls(cert: Path | None, key: Path | None) -> TlsFiles | None:
    if (cert is None) != (key is None):
        raise typer.BadParameter("give both --tls-cert and --tls-key, or neither")
    return TlsFiles(cert, key) if cert is not None and key is not None else None


def _source(
    profile: ModelProfile,
    no_model: bool,
    latency_ms: float,
    replay: Path | None,
    cache_dir: Path | None,
    threads: int,
) -> OutputSource:
    if profile.kind is OutputKind.SSD:
        if replay is None:
            raise typer.BadParameter("ssd_vgg needs --replay FILE.npz (no real SSD weights offline)")
        try:
            return ReplaySource(load_replay(replay, profile), latency_ms)
        except ReplayFileError as exc:
            raise typer.BadParameter(str(exc), param_hint="--replay") from exc
    if replay is not None:
        raise typer.BadParameter("--replay is for the ssd_vgg profile only")
    if no_model:
        return EmulatedSource(profile, latency_ms)
    if latency_ms:
        raise typer.BadParameter("--emulate-latency-ms needs --no-model: the real model takes its own time")
    return load_classifier_source(profile, cache_dir, threads)


def _warn_if_not_real(source: OutputSource, profile: ModelProfile, faults: FaultPlan) -> None:
    if source.emulated:
        if profile.kind is OutputKind.SSD:
            what = "the same replayed tensors for every image"
        else:
            what = "--no-model: scores derived from a hash of the image bytes"
        logger.warning("NOT REAL PREDICTIONS (%s): for benchmarks and tests only.", what)
    if faults.active:
        logger.warning("fault injection is on: %s", faults)


def _wait_for_stop_signal() -> None:
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    # A timeout keeps the main thread responsive to signals on every platform.
    while not stop.wait(0.5):
        pass


def main() -> None:
    """Entry point of `python -m deploy.standin`."""
    app(prog_name="python -m deploy.standin")
    sys.exit(0)
