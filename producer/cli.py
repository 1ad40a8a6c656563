"""The `blobscore` command: enqueue, status, results, worker, samples, and the local stack and stand-in."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from producer import exports
from producer.carrier import listing_queue, start_listing
from producer.diagnosis import diagnose
from producer.enqueue import EnqueueOptions, EnqueueReport, count_only, run_listing
from producer.exporter_cli import exporter_app
from producer.publishing import TaskPublisher
from producer.report_cli import report_app
from producer.scheduling.cli import mount as mount_schedules
from worker.celery_app import publisher_app
from worker.errors import BlobscoreError, ConfigurationError
from worker.jobs import JobSpec, JobStatus, JobStore
from worker.settings import Settings, load_settings
from worker.storage import BlobStore

app = typer.Typer(help="Score the JPEGs of an Azure Blob container through a TF-Serving gRPC scoring service.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
# Exit codes of every command: 0 success, 1 done but something failed (a rejected image, a service that does not
# answer), 2 a usage or configuration error (one line says what to fix).
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
samples_app = typer.Typer(help="Real sample photos for trying blobscore.", no_args_is_help=True)
app.add_typer(samples_app, name="samples")
services_app = typer.Typer(help="The scoring services this configuration knows.", no_args_is_help=True)
app.add_typer(services_app, name="services")
mount_schedules(app)
app.add_typer(report_app)
app.add_typer(exporter_app)
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"blobscore {package_version('blobscore')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    """Score the JPEGs of an Azure Blob container through a TF-Serving gRPC scoring service."""


def _mount_optional_apps() -> None:
    from deploy.local.cli import app as stack_app
    from deploy.standin.cli import app as standin_app

    if any(group.name == "stack" for group in app.registered_groups):
        return
    app.add_typer(stack_app, name="stack", help="Run the local stack: Redis, Azurite, the stand-in, a worker.")
    app.add_typer(standin_app, name="standin", help="The local stand-in scoring service (real CPU model).")


def _settings() -> Settings:
    return load_settings()


def _print_json(value: object) -> None:
    typer.echo(json.dumps(value, ensure_ascii=False))


@app.command()
def enqueue(
    container: Annotated[str | None, typer.Option(help="Source container.")] = None,
    prefix: Annotated[str, typer.Option(help="Only blobs whose names start with this.")] = "",
    service: Annotated[str | None, typer.Option(help="Scoring service name (default: the configured one).")] = None,
    results_container: Annotated[str | None, typer.Option(help="Where results go (default: the source).")] = None,
    results_prefix: Annotated[str | None, typer.Option(help="Default: blobscore-results/<service>/.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Queue at most this many images.")] = None,
    window: Annotated[int | None, typer.Option(min=1, help="Most tasks of the job waiting in the broker.")] = None,
    resume: Annotated[str | None, typer.Option(help="Carry on the listing of this job where it stopped.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="List in this process until the last page is queued.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List and count only; create no job.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Create a job for the JPEGs under CONTAINER/PREFIX that lack a current result, print its id and return.

    The listing is carried on by the fleet — every worker and `blobscore beat` take the job's listing steps, a
    page at a time, never more than the window of tasks waiting in the broker — so this returns at once; follow
    it with `blobscore status JOB --watch`. `--wait` lists in this process instead, until the last page is
    queued (a progress line on stderr). `--resume JOB` hands a stopped listing to the fleet again.
    """
    settings = _settings()
    jobs = JobStore.from_settings(settings)
    store = BlobStore.from_settings(settings)
    options = EnqueueOptions(limit=limit, window=window or settings.enqueue_window)
    if resume is not None:
        _check_origin(jobs, resume, settings)
        spec, job_id = jobs.spec(resume), resume
    elif container is None:
        raise typer.BadParameter("--container is required (or --resume JOB)")
    else:
        spec = _job_spec(settings, container, prefix, service, results_container, results_prefix)
        _check_containers(store, settings, spec)
        if dry_run:
            report = count_only(store, spec, options)
            _print_report(report, dry_run=True, as_json=as_json)
            return
        # A page is at most half the window: the next page is listed while the workers drain the first.
        job_id = jobs.create(spec, settings.deployment, extra={
            "window": options.window, "page_size": max(1, min(options.page_size, options.window // 2)),
            "limit": limit or "",
        })
    app = publisher_app(settings)
    if not wait:
        start_listing(app, settings, jobs, job_id)
        if as_json:
            _print_json({"job_id": job_id, "state": "listing", "dry_run": False})
        else:
            console.print(f"job {job_id} created; the workers list {spec.container}/{spec.prefix} and queue its "
                          f"images: follow it with `blobscore status {job_id} --watch`", markup=False)
            typer.echo(job_id)
        return
    publish = TaskPublisher(app, settings.queue_for(spec.service))
    report = run_listing(store, jobs, publish, job_id, options, on_page=_listing_progress(jobs, job_id))
    _print_report(report, dry_run=False, as_json=as_json)


def _check_containers(store: BlobStore, settings: Settings, spec: JobSpec) -> None:
    for name in sorted({spec.container, spec.results_container}):
        if not store.container_exists(name):
            raise BlobscoreError(f"container {name} does not exist in storage account {settings.account}: check "
                                 f"--container{' and --results-container' if name != spec.container else ''}")


def _listing_progress(jobs: JobStore, job_id: str) -> Callable[[int, int], None]:
    def show(listed: int, pages: int) -> None:
        waiting = listed - jobs.finished_count(job_id)
        console.print(f"job {job_id}: {pages} pages, {listed} images queued, {waiting} waiting in the window",
                      markup=False, highlight=False, soft_wrap=True)
    return show


def _print_report(report: EnqueueReport, *, dry_run: bool, as_json: bool) -> None:
    if report.listed == 0 and report.skipped_current == 0:
        console.print("nothing to score: no JPEG without a current result there", markup=False)
    if as_json:
        _print_json({"job_id": report.job_id, "listed": report.listed, "skipped_current": report.skipped_current,
                     "dry_run": dry_run})
    elif dry_run:
        typer.echo(f"would queue {report.listed} images ({report.skipped_current} already have a current result)")
    else:
        console.print(f"queued {report.listed} images, {report.skipped_current} already current")
        typer.echo(report.job_id)


def _job_spec(
    settings: Settings, container: str, prefix: str, service: str | None, results_container: str | None,
    results_prefix: str | None,
) -> JobSpec:
    service_name = settings.service_config(service).name
    return JobSpec(
        container=container, prefix=prefix, service=service_name,
        results_container=results_container or settings.results_container or container,
        results_prefix=results_prefix if results_prefix is not None else settings.results_prefix_for(service_name),
    )


def _check_origin(jobs: JobStore, job_id: str, settings: Settings) -> None:
    """Refuse to act on a job listed from another storage account: its results are not where these settings look."""
    origin, here = jobs.origin(job_id), settings.deployment
    if origin.account != here.account:
        raise BlobscoreError(
            f"job {job_id} was listed from storage account {origin.account} but these settings reach {here.account} "
            f"(both in namespace {here.namespace}): give each deployment its own BLOBSCORE_NAMESPACE, and run this "
            "command with the job's deployment's settings"
        )


def _status_dict(status: JobStatus) -> dict[str, object]:
    return {"job_id": status.job_id, "listed": status.listed, "ok": status.ok, "rejected": status.rejected,
            "retrying": status.retrying, "pending": status.pending, "state": status.state}


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="The job id enqueue printed.")],
    watch: Annotated[bool, typer.Option("--watch", help="Show a live progress bar until the job is done.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """How many images of a job were listed, scored, rejected, are retrying or pending."""
    settings = _settings()
    jobs = JobStore.from_settings(settings)
    _check_origin(jobs, job_id, settings)
    current = _watch(jobs, job_id, settings) if watch else jobs.status(job_id)
    problems = _problems(jobs, settings, current)
    if as_json:
        _print_json({**_status_dict(current), **({"problems": problems} if problems else {})})
    else:
        typer.echo(" ".join(f"{key}={value}" for key, value in _status_dict(current).items()))
        for line in problems:
            typer.echo(f"! {line}")


def _problems(jobs: JobStore, settings: Settings, current: JobStatus) -> list[str]:
    queue = settings.queue_for(jobs.spec(current.job_id).service)
    return diagnose(jobs, jobs.client, settings.key_prefix, queue, listing_queue(settings), current)


def _watch(jobs: JobStore, job_id: str, settings: Settings, poll_s: float = 0.5) -> JobStatus:
    """Follow a job to its end: a progress bar on a terminal, a plain line every few seconds when piped."""
    if not console.is_terminal:
        return _watch_plain(jobs, job_id, settings)
    current = jobs.status(job_id)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    shown: list[str] = []
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(job_id, total=current.listed or None)
        while True:
            progress.update(bar, total=current.listed or None, completed=current.ok + current.rejected,
                            description=f"{job_id} ok={current.ok} rejected={current.rejected} "
                                        f"retrying={current.retrying}")
            if current.state == "done":
                return current
            problems = _problems(jobs, settings, current)
            if problems != shown:
                for line in problems:
                    progress.console.print(f"! {line}", markup=False, highlight=False)
                shown = problems
            time.sleep(poll_s)
            current = jobs.status(job_id)


def _watch_plain(jobs: JobStore, job_id: str, settings: Settings, every_s: float = 5.0) -> JobStatus:
    last_line, last_at = "", 0.0
    while True:
        current = jobs.status(job_id)
        line = " ".join(f"{key}={value}" for key, value in _status_dict(current).items())
        if current.state == "done":
            return current
        if line != last_line or time.monotonic() - last_at >= every_s:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
            for problem in _problems(jobs, settings, current):
                console.print(f"! {problem}", markup=False, highlight=False, soft_wrap=True)
            last_line, last_at = line, time.monotonic()
        time.sleep(0.5)


@app.command()
def results(
    job_id: Annotated[str, typer.Argument(help="The job id enqueue printed.")],
    output_format: Annotated[str, typer.Option("--format", help="jsonl, csv or table.")] = "jsonl",
) -> None:
    """Export a job's result documents."""
    settings = _settings()
    jobs = JobStore.from_settings(settings)
    _check_origin(jobs, job_id, settings)
    docs = exports.job_results(BlobStore.from_settings(settings), jobs, job_id)
    if output_format == "jsonl":
        for doc in docs:
            typer.echo(doc.to_json().decode("utf-8"))
    elif output_format == "csv":
        typer.echo(exports.to_csv(docs), nl=False)
    elif output_format == "table":
        Console().print(exports.to_table(docs))
    else:
        raise typer.BadParameter("--format must be jsonl, csv or table")


@app.command()
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
    settings = _settings()
    if address is None:
        return settings.model_copy(update={"service": settings.service_config(service).name})
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise typer.BadParameter("--address must be HOST:PORT")
    key = os.environ.get(key_env) if key_env else None
    if key_env and key is None:
        raise typer.BadParameter(f"environment variable {key_env} is not set")
    return load_settings(
        scoring_address=host.strip("[]"), scoring_port=int(port), scoring_tls=tls, scoring_key=key,
        scoring_service_name=service_name, scoring_model=model or settings.scoring_model,
        service=service_name or address,
    )


@app.command()
def reconcile(
    job_id: Annotated[str, typer.Argument(help="The job id enqueue printed.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report only; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Compare a job's listing with its results; re-queue every image that has neither."""
    from producer.reconcile import reconcile as run_reconcile
    settings = _settings()
    jobs = JobStore.from_settings(settings)
    _check_origin(jobs, job_id, settings)
    spec = jobs.spec(job_id)
    publish = None if dry_run else TaskPublisher(publisher_app(settings), settings.queue_for(spec.service))
    report = run_reconcile(BlobStore.from_settings(settings), jobs, publish, job_id)
    summary = {"job_id": report.job_id, "listed": report.listed, "finished": report.finished,
               "counted_from_results": report.counted_from_results,
               ("would_requeue" if dry_run else "requeued"): report.requeued,
               "source_missing": report.source_missing, "dry_run": dry_run}
    if as_json:
        _print_json(summary)
    else:
        typer.echo(" ".join(f"{key}={value}" for key, value in summary.items()))


@app.command()
def worker(
    region: Annotated[str | None, typer.Option(help="Consume the queues of this region's services only.")] = None,
    service: Annotated[list[str] | None, typer.Option(help="Consume this service's queue only (repeatable).")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Images in flight per process (threads).")] = None,
    metrics_port: Annotated[int | None, typer.Option(min=1, max=65535, help="Serve Prometheus metrics on this port "
                                                     "(BLOBSCORE_METRICS_PORT).")] = None,
) -> None:
    """Run a Celery worker that scores images (by default for every known service)."""
    from worker.worker_main import run_worker

    settings = _settings()
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    run_worker(settings, region, service, concurrency)


@services_app.command("list")
def services_list(as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """The deployment's namespace and account, and the known services: region, address, TLS, model, key variable."""
    settings = _settings()
    described = {name: service.describe() for name, service in sorted(settings.all_services().items())}
    deployment = _deployment_view(settings)
    if as_json:
        _print_json({"deployment": deployment, "services": described})
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

    settings = _settings()
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
        _print_json(report)
    else:
        for name, outcome in report.items():
            typer.echo(f"{name}: {'ok' if outcome['ok'] else 'FAILED'} ({outcome['detail']})")
    if not all(outcome["ok"] for outcome in report.values()):
        raise typer.Exit(1)


@samples_app.command("upload")
def samples_upload(
    container: Annotated[str, typer.Option(help="Container to upload into (created if missing).")] = "demo",
    prefix: Annotated[str, typer.Option(help="Prefix for the blob names.")] = "",
) -> None:
    """Upload real sample photos (scikit-image's and matplotlib's) as JPEG blobs."""
    from producer.samples import sample_photos

    store = BlobStore.from_settings(_settings())
    store.ensure_container(container)
    for name, data in sample_photos().items():
        store.upload(container, f"{prefix}{name}", data, "image/jpeg")
        console.print(f"uploaded {container}/{prefix}{name} ({len(data)} bytes)")


@app.command()
def demo(
    container: Annotated[str, typer.Option(help="Container for the sample photos.")] = "demo",
) -> None:
    """Upload the sample photos, score them on the running stack, and print image -> top-1 label."""
    samples_upload(container=container, prefix="")
    settings = _settings()
    started = time.perf_counter()
    jobs = JobStore.from_settings(settings)
    spec = _job_spec(settings, container, "", None, None, None)
    job_id = jobs.create(spec, settings.deployment, extra={"window": settings.enqueue_window})
    start_listing(publisher_app(settings), settings, jobs, job_id)  # the stack's worker lists and scores
    console.print(f"job {job_id}: the worker lists {container} and scores what has no current result")
    final = _watch(jobs, job_id, settings)
    elapsed = time.perf_counter() - started
    Console().print(exports.to_table(exports.job_results(BlobStore.from_settings(settings), jobs, job_id)))
    rate = final.listed / elapsed if elapsed > 0 else 0.0
    console.print(f"{final.ok} ok, {final.rejected} rejected in {elapsed:.1f} s ({rate:.1f} images/s)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `blobscore` console script: the one error boundary of every command.

    An expected failure (a setting, a config file, an unreachable service, an unknown job, a bad option) prints one
    line naming what to fix and exits 2; `--debug` shows the traceback instead. Anything else is a bug and keeps its
    traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [arg for arg in args if arg != "--debug"]
    _mount_optional_apps()
    try:
        code = app(args=args, prog_name="blobscore", standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        raise SystemExit(130) from None
    except typer.TyperException as exc:  # a usage error: typer's own (vendored) click exceptions derive from it
        if debug:
            raise
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        typer.echo(f"error: {message} (see blobscore --help)", err=True)
        raise SystemExit(EXIT_USAGE) from None
    except BlobscoreError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
