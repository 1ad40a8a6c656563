"""`blobscore schedule add|list|remove|run` and `blobscore beat`, mounted on the `blobscore` command by `mount(app)`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from worker.errors import BlobscoreError
from worker.settings import Settings, load_settings

if TYPE_CHECKING:
    from producer.scheduling.spec import ScheduleSpec
    from worker.deployment import AccountRef
    from worker.storage import BlobStore

schedule_app = typer.Typer(help="Score new images on a timetable: schedules kept in Redis, fired by `blobscore beat`.",
                           no_args_is_help=True)
console = Console(stderr=True)


class UnknownContainerError(BlobscoreError):
    """The schedule's container does not exist in the storage account."""


def check_container(spec: ScheduleSpec, store: BlobStore, account: AccountRef) -> None:
    """UnknownContainerError unless the spec's container exists in the storage account (lists one blob at most)."""
    from worker.storage import BlobNotFoundError

    try:
        next(store.list_pages(spec.container, spec.prefix, None, 1), None)
    except BlobNotFoundError as exc:  # a listing is "not found" only when its container is
        raise UnknownContainerError(
            f"container {spec.container} does not exist in storage account {account}: check --container, or create "
            "the container first"
        ) from exc


def _settings() -> Settings:
    return load_settings()


def _print_json(value: object) -> None:
    typer.echo(json.dumps(value, ensure_ascii=False))


@schedule_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The schedule's name (letters, digits, _ . -).")],
    container: Annotated[str, typer.Option(help="Source container.")],
    service: Annotated[str, typer.Option(help="Scoring service that scores this schedule's images.")],
    prefix: Annotated[str, typer.Option(help="Only blobs whose names start with this.")] = "",
    cron: Annotated[str | None, typer.Option(help='5-field cron expression in UTC, e.g. "0 * * * *".')] = None,
    every: Annotated[str | None, typer.Option(help="Interval: 30s, 15m, 1h, 2d (or sums like 1h30m).")] = None,
    results_container: Annotated[str | None, typer.Option(help="Where results go (default: the source).")] = None,
    results_prefix: Annotated[str | None, typer.Option(help="Default: blobscore-results/<service>/.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the schedule as one JSON object.")] = False,
) -> None:
    """Create or replace a schedule: score the new and changed images under CONTAINER/PREFIX on a timetable."""
    from producer.scheduling.spec import check_service, make_spec
    from producer.scheduling.store import ScheduleStore
    from worker.storage import BlobStore

    if (cron is None) == (every is None):
        raise typer.BadParameter("give exactly one of --cron or --every")
    settings = _settings()
    spec = make_spec(name=name, container=container, prefix=prefix, service=service, cron=cron, every=every,
                     results_container=results_container, results_prefix=results_prefix)
    check_service(spec, settings)
    blobs = BlobStore.from_settings(settings)
    try:
        check_container(spec, blobs, settings.account)
    finally:
        blobs.close()
    store = ScheduleStore.from_settings(settings)
    try:
        new = store.add(spec)
        info = store.info(name)
    finally:
        store.close()
    if as_json:
        _print_json(info.to_dict())
    else:
        verb = "added" if new else "replaced"
        typer.echo(f"{verb} schedule {name}: {spec.when}, next run {info.to_dict()['next_run_at']}")


@schedule_app.command("list")
def list_schedules(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: name -> schedule.")] = False,
) -> None:
    """Every schedule with its last run (time, job id, counts) and its next run."""
    from producer.scheduling.store import ScheduleStore

    store = ScheduleStore.from_settings(_settings())
    try:
        infos = [info.to_dict() for info in store.infos()]
    finally:
        store.close()
    if as_json:
        _print_json({info["name"]: info for info in infos})
        return
    if not infos:
        typer.echo("no schedules")
    for info in infos:
        last = (f"last {info['last_run_at']} job {info['last_job_id']} (queued {info['last_run']['listed']})"
                if info["last_run"] else "never run")
        typer.echo(f"{info['name']}: {info['when']} {info['container']}/{info['prefix']} service={info['service']} "
                   f"[{info['origin']}] {last}, next {info['next_run_at']}")


@schedule_app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="The schedule's name.")]) -> None:
    """Delete a schedule (its jobs and results stay). A config-file schedule comes back when beat restarts."""
    from producer.scheduling.store import ScheduleStore, UnknownScheduleError

    store = ScheduleStore.from_settings(_settings())
    try:
        if not store.remove(name):
            raise UnknownScheduleError(f"no schedule {name!r}")
    finally:
        store.close()
    typer.echo(f"removed schedule {name}")


@schedule_app.command("run")
def run(
    name: Annotated[str, typer.Argument(help="The schedule's name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Run a schedule now, in this process: queue its new and changed images as a new job; print the job id.

    Exits 1, queueing nothing, if another run of the schedule is in progress.
    """
    from producer.scheduling.app import schedules_app
    from producer.scheduling.run import RunResources, run_now

    settings = _settings()
    resources = RunResources(settings, schedules_app(settings))
    try:
        spec = resources.get()[2].get(name)
        report = run_now(spec, settings, resources, "manual")
    finally:
        resources.close()
    if as_json:
        _print_json(report.to_dict())
    elif report.busy:
        console.print(f"schedule {name}: another run is in progress; nothing queued")
    else:
        console.print(f"queued {report.listed} images, {report.skipped_current} already current or in flight")
        typer.echo(report.job_id)
    if report.busy:
        raise typer.Exit(1)


# typer renders the help as rich markup: the escaped bracket keeps `[schedules.NAME]` from being read as a markup
# tag, and dropped.
def beat_command(
    concurrency: Annotated[int, typer.Option(min=1, help="Scheduled runs executed at once by this process.")] = 2,
) -> None:
    """Fire the schedules kept in Redis (celery beat with redbeat) and execute their runs; syncs the config file's
    \\[schedules.NAME] tables first. Run several for availability: one fires, the others stand by."""
    from producer.scheduling.beat import run_beat
    from producer.scheduling.config import config_path, schedules_from_config

    run_beat(_settings(), schedules_from_config(config_path()), concurrency)


def mount(app: typer.Typer) -> None:
    """Add `schedule ...` and `beat` to a typer app (the `blobscore` command)."""
    app.add_typer(schedule_app, name="schedule")
    app.command("beat")(beat_command)
