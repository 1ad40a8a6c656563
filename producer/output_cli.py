"""Exit codes of every `blobscore` command, and how the job and service commands answer: stderr, --json, key=value."""

from __future__ import annotations

import json
from collections.abc import Mapping

import typer
from rich.console import Console

# Exit codes of every command: 0 success, 1 done but something failed (a rejected image, a service that does not
# answer), 2 a usage or configuration error (one line says what to fix; producer/cli.py `main`).
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
# Progress and notes go to stderr: stdout carries only what a script reads (ids, JSON, result documents).
console = Console(stderr=True)


def print_json(value: object) -> None:
    """One JSON object on one line of stdout (--json)."""
    typer.echo(json.dumps(value, ensure_ascii=False))


def key_value_line(fields: Mapping[str, object]) -> str:
    """`key=value key=value ...`: the plain one-line form of what --json prints."""
    return " ".join(f"{key}={value}" for key, value in fields.items())
