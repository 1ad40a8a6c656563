"""The scoring-side commands of `blobscore`: services list|check, score local files, run a worker, upload samples."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from producer.output_cli import EXIT_SOME_FAILED, console, print_json
from worker.errors import BlobscoreError, ConfigurationError
from worker.settings import Settings, load_settings
from worker.storage import BlobStore

service_app = typer.Typer()  # merged into `blobscore` (producer/cli.py): score, worker, samples, services
samples_app = typer.Typer(help="Real sample photos for trying blobscore.", no_args_is_help=True)
services_app = typer.Typer(help="The scoring services this configuration knows.", no_args_is_help=True)
service_app.add_typer(samples_app, name="samples")
service_app.add_typer(services_app, name="services")


@service_app.command()
def score(
    files: Annotated[list[Path], typer.Argument(help="Image files; one Predict request each.")],
    service: Annotated[str | None, typer.Option(help="A configured service (default: the configured one).")] = None,
    address: Annotated[str | None, typer.Option(help="HOST:PORT of a scoring service, instead of --service.")] = None,
    model: Annotated[str | None, typer.Option(help="Model profile with --address: resnet50, ..., ssd_vgg.")] = None,
    tls: Annotated[bool, typer.Option("--tls", help="Use TLS with --address.")] = False,
    key_env: Annotated[str | None, typer.Option(help="Environment variable holding the service key.")] = None,
    service_name: Annotated[str | None, typer.Option(help="Azure ML service name (the route header).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON result document per line.")] = False,
) -> None:
    """Score local image files through a scoring service and print the result document the worker would write."""
    from producer.score_files import describe, score_files

    settings = _settings_for_scoring(service, address, model, tls, key_env, service_name)
    rejected = 0
    for doc in score_files(files, settings):
        rejected += doc.status != "ok"
        typer.echo(doc.to_json().decode("utf-8") if as_json else describe(doc))
    if rejected:
        raise typer.Exit(EXIT_SOME_FAILED)


def _settings_for_scoring(
    service: str | None, address: str | None, model: str | None, tls: bool, key_env: str | None,
    service_name: str | None,
) -> Settings:
    settings = load_settings()
    if address is None:
        return settings.model_copy(update={"service": settings.service_config(service).name})
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise typer.BadParameter("--address must be HOST:PORT")
    # A one-service registry: the settings loader reads the key from the variable it names, as for any service.
    name = service_name or address
    services = {name: {"name": name, "address": host.strip("[]"), "port": int(port), "tls": tls, "key_env": key_env,
                       "route": service_name, "model": model or settings.scoring_model}}
    scoring = load_settings(services=services, service=name)
    if key_env and scoring.service_config(name).key is None:
        raise typer.BadParameter(f"environment variable {key_env} is not set", param_hint="--key-env")
    return scoring


@service_app.command()
def worker(
    region: Annotated[str | None, typer.Option(help="Consume the queues of this region's services only.")] = None,
    service: Annotated[list[str] | None, typer.Option(help="Consume this service's queue only (repeatable).")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Images in flight per process (threads).")] = None,
    metrics_port: Annotated[int | None, typer.Option(min=1, max=65535, help="Serve Prometheus metrics on this port "
                                                     "(BLOBSCORE_METRICS_PORT).")] = None,
) -> None:
    """Run a Celery worker that scores images (by default for every known service)."""
    from worker.worker_main import run_worker

    settings = load_settings()
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    run_worker(settings, region, service, concurrency)


@services_app.command("list")
def services_list(as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """The deployment's namespace and account, and the known services: region, address, TLS, model, key variable."""
    settings = load_settings()
    described = {name: service.describe() for name, service in sorted(settings.all_services().items())}
    deployment = _deployment_view(settings)
    if as_json:
        print_json({"deployment": deployment, "services": described})
        return
    typer.echo(f"deployment: namespace={deployment['namespace']} account={deployment['account']} "
               f"endpoint={deployment['endpoint']}")
    for name, info in described.items():
        key = f"key from ${info['key_env']}" if info["key_env"] else ("key set" if info["key_set"] else "no key")
        typer.echo(f"{name}: region={info['region']} {info['address']}:{info['port']} tls={info['tls']} "
                   f"model={info['model']} route={info['route']} {key}")


def _deployment_view(settings: Settings) -> dict[str, str | None]:
    """Namespace and account of the settings; None where no storage account is configured yet."""
    try:
        deployment = settings.deployment
    except ConfigurationError:
        return {"namespace": settings.namespace, "account": None, "endpoint": None}
    return {"namespace": deployment.namespace, "account": deployment.account.name,
            "endpoint": deployment.account.endpoint}


@services_app.command("check")
def services_check(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Reach every known service with its key and route; exit 1 if any does not answer."""
    from worker.scoring import Scorer

    settings = load_settings()
    report: dict[str, dict[str, object]] = {}
    for name, service in sorted(settings.all_services().items()):
        scorer = Scorer.for_service(service, settings)
        try:
            report[name] = {"ok": True, "detail": scorer.check()}
        except BlobscoreError as exc:
            report[name] = {"ok": False, "detail": str(exc)}
        finally:
            scorer.close()
    if as_json:
        print_json(report)
    else:
        for name, outcome in report.items():
            typer.echo(f"{name}: {'ok' if outcome['ok'] else 'FAILED'} ({outcome['detail']})")
    if not all(outcome["ok"] for outcome in report.values()):
        raise typer.Exit(EXIT_SOME_FAILED)


@samples_app.command("upload")
def samples_upload(
    container: Annotated[str, typer.Option(help="Container to upload into (created if missing).")] = "demo",
    prefix: Annotated[str, typer.Option(help="Prefix for the blob names.")] = "",
) -> None:
    """Upload real sample photos (scikit-image's and matplotlib's) as JPEG blobs."""
    from producer.samples import sample_photos

    store = BlobStore.from_settings(load_settings())
    store.ensure_container(container)
    for name, data in sample_photos().items():
        store.upload(container, f"{prefix}{name}", data, "image/jpeg")
        console.print(f"uploaded {container}/{prefix}{name} ({len(data)} bytes)")
