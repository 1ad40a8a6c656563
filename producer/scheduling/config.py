"""The schedules a config file declares: its `[schedules.NAME]` tables as ScheduleSpecs."""

from __future__ import annotations

import tomllib
from pathlib import Path

from producer.scheduling.spec import InvalidScheduleError, ScheduleSpec, make_spec
from worker.settings import config_path

__all__ = ["config_path", "schedules_from_config"]


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
