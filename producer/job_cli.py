"""The job commands of `blobscore`: enqueue, status (--watch), results, reconcile, and the demo that runs one."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from producer import exports
from producer.carrier import listing_queue, start_listing
from producer.diagnosis import diagnose
from producer.enqueue import EnqueueOptions, EnqueueReport, count_only, run_listing
from producer.output_cli import console, key_value_line, print_json
from producer.publishing import TaskPublisher
from producer.service_cli import samples_upload
from worker.celery_app import publisher_app
from worker.errors import BlobscoreError, TransientError
from worker.jobs import JobSpec, JobStatus, JobStore
from worker.settings import Settings, load_settings
from worker.storage import BlobStore

job_app = typer.Typer()  # merged into `blobscore` (producer/cli.py): its commands are top-level


@job_app.command()
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
    settings = load_settings()
    jobs = JobStore.from_settings(settings)
    store = BlobStore.from_settings(settings)
    options = EnqueueOptions(limit=limit, window=window or settings.enqueue_window)
    if resume is not None:
        check_origin(jobs, resume, settings)
        spec, job_id = jobs.spec(resume), resume
    elif container is None:
        raise typer.BadParameter("--container is required (or --resume JOB)")
    else:
        spec = _job_spec(settings, container, prefix, service, results_container, results_prefix)
        _check_containers(store, settings, spec)
        _note_if_empty(store, spec)
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
            print_json({"job_id": job_id, "state": "listing", "dry_run": False})
        else:
            console.print(f"job {job_id} created; the workers list {spec.container}/{spec.prefix} and queue its "
                          f"images: follow it with `blobscore status {job_id} --watch`", markup=False)
            typer.echo(job_id)
        return
    publish = TaskPublisher(app, settings.queue_for(spec.service))
    report = run_listing(store, jobs, publish, job_id, options, on_page=_listing_progress(jobs, job_id))
    _print_report(report, dry_run=False, as_json=as_json)


def _note_if_empty(store: BlobStore, spec: JobSpec) -> None:
    # The listing runs on the fleet after this returns: a mistyped prefix would only show later, in `status`.
    first = next(iter(store.list_pages(spec.container, spec.prefix, None, 1)), None)
    if first is None or not first.blobs:
        where = f"{spec.container}/{spec.prefix}" if spec.prefix else f"container {spec.container}"
        console.print(f"note: nothing to score: no blob under {where} (check --prefix); the job ends at once",
                      markup=False)


def _check_containers(store: BlobStore, settings: Settings, spec: JobSpec) -> None:
    for name in sorted({spec.container, spec.results_container}):
        try:
            exists = store.container_exists(name)
        except TransientError as exc:
            raise BlobscoreError(f"{exc}: check BLOBSCORE_BLOB_CONNECTION_STRING (or BLOBSCORE_BLOB_ACCOUNT_URL) and "
                                 "that the endpoint answers") from exc
        if not exists:
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
        print_json({"job_id": report.job_id, "listed": report.listed, "skipped_current": report.skipped_current,
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


def check_origin(jobs: JobStore, job_id: str, settings: Settings) -> None:
    """Refuse to act on a job listed from another storage account: its results are not where these settings look."""
    origin, here = jobs.origin(job_id), settings.deployment
    if origin.account != here.account:
        raise BlobscoreError(
            f"job {job_id} was listed from storage account {origin.account} but these settings reach {here.account} "
            f"(both in namespace {here.namespace}): give each deployment its own BLOBSCORE_NAMESPACE, and run this "
            "command with the job's deployment's settings"
        )


def existing_job(job_id: str) -> tuple[Settings, JobStore]:
    """The settings and job store for a command on an existing job of this deployment (`_check_origin`)."""
    settings = load_settings()
    jobs = JobStore.from_settings(settings)
    check_origin(jobs, job_id, settings)
    return settings, jobs


def _status_dict(status: JobStatus) -> dict[str, object]:
    return {"job_id": status.job_id, "listed": status.listed, "ok": status.ok, "rejected": status.rejected,
            "retrying": status.retrying, "pending": status.pending, "state": status.state}


@job_app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="The job id enqueue printed.")],
    watch: Annotated[bool, typer.Option("--watch", help="Show a live progress bar until the job is done.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """How many images of a job were listed, scored, rejected, are retrying or pending."""
    settings, jobs = existing_job(job_id)
    current = _watch(jobs, job_id, settings) if watch else jobs.status(job_id)
    problems = _problems(jobs, settings, current)
    if as_json:
        print_json({**_status_dict(current), **({"problems": problems} if problems else {})})
    else:
        typer.echo(key_value_line(_status_dict(current)))
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
        line = key_value_line(_status_dict(current))
        if current.state == "done":
            return current
        if line != last_line or time.monotonic() - last_at >= every_s:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
            for problem in _problems(jobs, settings, current):
                console.print(f"! {problem}", markup=False, highlight=False, soft_wrap=True)
            last_line, last_at = line, time.monotonic()
        time.sleep(0.5)


@job_app.command()
def results(
    job_id: Annotated[str, typer.Argument(help="The job id enqueue printed.")],
    output_format: Annotated[str, typer.Option("--format", help="jsonl, csv or table.")] = "jsonl",
) -> None:
    """Export a job's result documents."""
    settings, jobs = existing_job(job_id)
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


@job_app.command()
def reconcile(
    job_id: Annotated[str, typer.Argument(help="The job id enqueue printed.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report only; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Compare a job's listing with its results; re-queue every image that has neither."""
    from producer.reconcile import reconcile as run_reconcile
    settings, jobs = existing_job(job_id)
    spec = jobs.spec(job_id)
    publish = None if dry_run else TaskPublisher(publisher_app(settings), settings.queue_for(spec.service))
    report = run_reconcile(BlobStore.from_settings(settings), jobs, publish, job_id)
    summary = {"job_id": report.job_id, "listed": report.listed, "finished": report.finished,
               "counted_from_results": report.counted_from_results,
               ("would_requeue" if dry_run else "requeued"): report.requeued,
               "source_missing": report.source_missing, "dry_run": dry_run}
    if as_json:
        print_json(summary)
    else:
        typer.echo(key_value_line(summary))


@job_app.command()
def demo(
    container: Annotated[str, typer.Option(help="Container for the sample photos.")] = "demo",
) -> None:
    """Upload the sample photos, score them on the running stack, and print image -> top-1 label."""
    samples_upload(container=container, prefix="")
    settings = load_settings()
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
