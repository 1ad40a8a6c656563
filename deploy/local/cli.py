"""`blobscore stack up|down|status`: the local stack from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from deploy.local import stack
from deploy.local.stack import PIECES, PieceName, StackError, StackStatus

app = typer.Typer(help="Run the local stack in the background.", no_args_is_help=True)
# How `blobscore --help` lists this app as `blobscore stack` (entry point blobscore.commands, pyproject.toml).
COMMAND_HELP = "Run the local stack: Redis, Azurite, the stand-in, a worker."
console = Console()
errors = Console(stderr=True)

WorkdirOption = Annotated[
    Path, typer.Option(help="Where the stack keeps .blobscore/ (pids, logs, data).", file_okay=False)
]


@app.command()
def up(
    workdir: WorkdirOption = Path("."),
    only: Annotated[
        list[str] | None, typer.Option("--only", help=f"Start only these pieces (repeatable): {', '.join(PIECES)}.")
    ] = None,
    broker_url: Annotated[str | None, typer.Option(help="Redis to use (default: the configured one).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes to keep running (default 1).")] = None,
) -> None:
    """Start what does not run yet: Redis, Azurite, the stand-in scorer and supervised workers."""
    pieces = _pieces(only)
    try:
        with console.status("starting the local stack…"):
            report = stack.up(workdir, pieces=pieces, broker_url=broker_url, workers=workers)
    except StackError as exc:
        errors.print(f"[red]{exc}[/red]\nStop what did start with: blobscore stack down")
        raise typer.Exit(1) from exc
    _print_status(report)
    console.print("Stop it with: [bold]blobscore stack down[/bold]")


@app.command()
def down(workdir: WorkdirOption = Path(".")) -> None:
    """Stop what `up` started here (never a Redis it found running)."""
    stopped = stack.down(workdir)
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop")


@app.command()
def status(
    workdir: WorkdirOption = Path("."),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """What runs, and the settings a client needs to reach it (scoring key masked)."""
    report = stack.status(workdir)
    if as_json:
        typer.echo(report.model_dump_json())
    else:
        _print_status(report)


def _pieces(only: list[str] | None) -> tuple[PieceName, ...]:
    if not only:
        return PIECES
    unknown = sorted(set(only) - set(PIECES))
    if unknown:
        raise typer.BadParameter(f"unknown pieces {unknown}; choose from {', '.join(PIECES)}", param_hint="--only")
    return tuple(name for name in PIECES if name in only)


def _print_status(report: StackStatus) -> None:
    if not report.pieces:
        console.print(f"no local stack in {report.workdir}")
        return
    table = Table(title=f"local stack in {report.workdir}")
    for column in ("piece", "state", "pid"):
        table.add_column(column)
    table.add_column("log", overflow="fold")
    for piece in report.pieces:
        state = "[green]running[/green]" if piece.alive else "[red]stopped[/red]"
        owner = "" if piece.started_by_us else " (found running, not ours)"
        if piece.restarts is not None:
            owner += f" ({len(piece.children)} processes, {piece.restarts} restarts)"
        table.add_row(piece.name, state + owner, str(piece.pid or "-"), piece.log or "-")
    console.print(table)
    if report.namespace is not None:
        console.print(f"  [bold]namespace[/bold] = {report.namespace}", soft_wrap=True)
    if report.settings is not None:
        for key, value in report.settings.model_dump(exclude_none=True).items():
            console.print(f"  [bold]{key}[/bold] = {value}", soft_wrap=True)  # unbroken, to copy


if __name__ == "__main__":
    app()
