"""The schedules a config file declares: its `[schedules.NAME]` tables as ScheduleSpecs."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from producer.scheduling.spec import InvalidScheduleError, ScheduleSpec, make_spec
from worker.settings import CONFIG_FILE


def config_path() -> Path:
    """The config file the settings read: $BLOBSCORE_CONFIG, else ./blobscore.toml."""
    value = os.environ.get("BLOBSCORE_CONFIG")
    return Path(value) if value else Path.cwd() / CONFIG_FILE


def schedules_from_config(path: Path) -> dict[str, ScheduleSpec]:
    """The `[schedules.NAME]` tables of a config file (none when the file does not exist).

    Each table holds container, prefix, service and cron or every; `blobscore beat` writes them into Redis when it
    starts (`ScheduleStore.sync_config`).
    """
    if not path.is_file():
        return {}
    with path.open("rb") as handle:
        document = tomllib.load(handle)
    tables = document.get("schedules", {})
    if not isinstance(tables, dict):
        raise InvalidScheduleError(f"{path}: [schedules] must hold [schedules.NAME] tables")
    specs = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise InvalidScheduleError(f"{path}: schedules.{name} must be a table")
        specs[name] = make_spec(name=name, **table)
    return specs
