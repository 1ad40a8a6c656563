"""The `blobscore` command: one app, its global options, the commands mounted on it, and `main`'s error boundary.

The commands live by job: producer/job_cli.py (enqueue, status, results, reconcile, demo), producer/service_cli.py
(score, worker, services, samples), producer/report_cli.py, producer/exporter_cli.py, producer/scheduling/cli.py
(schedule, beat). Other packages add commands through the `blobscore.commands` entry points (pyproject.toml): the
local stack and the stand-in scorer of deploy/ come in that way, so the producer never imports deploy.
"""

from __future__ import annotations

import sys
from importlib import import_module
from importlib.metadata import entry_points
from importlib.metadata import version as package_version
from typing import Annotated

import typer

from producer.exporter_cli import exporter_app
from producer.flower_cli import flower_app
from producer.job_cli import job_app
from producer.output_cli import EXIT_USAGE
from producer.report_cli import report_app
from producer.scheduling.cli import mount as mount_schedules
from producer.service_cli import service_app
from worker.errors import BlobscoreError

# Commands other installed packages add to `blobscore`: NAME = "module:typer_app" (deploy's stack and standin). The
# module may set COMMAND_HELP, the line `blobscore --help` shows for it (else the app's own help).
COMMANDS_GROUP = "blobscore.commands"

app = typer.Typer(help="Score the JPEGs of an Azure Blob container through a TF-Serving gRPC scoring service.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
# `blobscore --help` lists the commands in this order (beat, a command of its own, first), the groups after them.
app.add_typer(job_app)
app.add_typer(service_app)
mount_schedules(app)
app.add_typer(report_app)
app.add_typer(exporter_app)
app.add_typer(flower_app)


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
    """Mount every `blobscore.commands` entry point under its name (once: a second call adds nothing)."""
    mounted = {group.name for group in app.registered_groups}
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda entry: entry.name):
        if entry.name in mounted:
            continue
        command = entry.load()
        help_text = getattr(import_module(entry.module), "COMMAND_HELP", None)
        if help_text:
            app.add_typer(command, name=entry.name, help=help_text)
        else:
            app.add_typer(command, name=entry.name)
        mounted.add(entry.name)


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
