"""What a schedule is, pure: cron and interval parsing, the validated ScheduleSpec, and when it next runs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from celery.schedules import crontab
from celery.schedules import schedule as interval_schedule
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from worker.errors import BlobscoreError
from worker.jobs import JobSpec
from worker.settings import Settings

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
# A cron run's message is dropped if no consumer took it within this long (the next tick fires anyway).
CRON_RUN_EXPIRES_S = 60.0

_EVERY_PART = re.compile(r"(\d+)\s*([smhd])")
_EVERY_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class InvalidScheduleError(BlobscoreError):
    """A schedule that cannot work: bad name, interval, cron expression or missing fields."""


def parse_every(text: str) -> timedelta:
    """`30s`, `15m`, `1h`, `2d` or a sum of them (`1h30m`) as a timedelta of at least one second."""
    compact = text.strip().lower()
    parts = _EVERY_PART.findall(compact)
    if not parts or "".join(f"{number}{unit}" for number, unit in parts) != compact.replace(" ", ""):
        raise InvalidScheduleError(f"--every {text!r}: use a number and a unit s, m, h or d, e.g. 30s, 15m, 1h, 2d")
    seconds = sum(int(number) * _EVERY_UNITS[unit] for number, unit in parts)
    if seconds < 1:
        raise InvalidScheduleError(f"--every {text!r}: the interval must be at least one second")
    return timedelta(seconds=seconds)


def parse_cron(text: str) -> crontab:
    """A 5-field cron expression (minute hour day-of-month month day-of-week, in UTC) as a celery crontab."""
    fields = text.split()
    if len(fields) != 5:
        raise InvalidScheduleError(
            f"--cron {text!r}: expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}"
        )
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
                       day_of_week=day_of_week)
    except ValueError as exc:
        raise InvalidScheduleError(f"--cron {text!r}: {exc}") from exc


class ScheduleSpec(BaseModel):
    """What a schedule scores, with which service, and when: `cron` or `every`, exactly one.

    Cron expressions are evaluated in UTC. A new schedule first fires one interval after it was added (cron: at the
    next matching minute).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    container: str = Field(min_length=1)
    prefix: str = ""
    service: str = Field(min_length=1)
    cron: str | None = None
    every: str | None = None
    results_container: str | None = None
    results_prefix: str | None = None

    @field_validator("cron", "every")
    @classmethod
    def _timing_parses(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        try:
            if info.field_name == "cron":
                parse_cron(value)
                return " ".join(value.split())
            parse_every(value)
            return value.strip().lower().replace(" ", "")
        except InvalidScheduleError as exc:
            raise ValueError(str(exc)) from exc

    @model_validator(mode="after")
    def _one_timing(self) -> ScheduleSpec:
        if (self.cron is None) == (self.every is None):
            raise ValueError("give exactly one of cron or every")
        return self

    @property
    def when(self) -> str:
        """`every 1h` or `cron 0 * * * *`."""
        return f"every {self.every}" if self.every is not None else f"cron {self.cron}"

    def celery_schedule(self) -> interval_schedule | crontab:
        """The celery schedule redbeat evaluates."""
        if self.every is not None:
            return interval_schedule(run_every=parse_every(self.every))
        assert self.cron is not None
        return parse_cron(self.cron)

    def run_expires_s(self) -> float:
        """How long a fired run may wait for a consumer before it is dropped: one period."""
        return parse_every(self.every).total_seconds() if self.every is not None else CRON_RUN_EXPIRES_S

    def job_spec(self, settings: Settings) -> JobSpec:
        """The job each run creates; results default like `blobscore enqueue`'s."""
        return JobSpec(
            container=self.container, prefix=self.prefix, service=self.service,
            results_container=self.results_container or settings.results_container or self.container,
            results_prefix=(self.results_prefix if self.results_prefix is not None
                            else settings.results_prefix_for(self.service)),
        )

    def to_args(self) -> dict[str, Any]:
        """The JSON-able argument of the scheduled run task (names, never a key or secret)."""
        return self.model_dump(mode="json")


def make_spec(**fields: Any) -> ScheduleSpec:
    """A validated ScheduleSpec, or InvalidScheduleError saying what is wrong (never a pydantic traceback)."""
    try:
        return ScheduleSpec(**fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'schedule'}: {_error_message(error)}"
            for error in exc.errors(include_input=False, include_url=False)
        )
        raise InvalidScheduleError(f"schedule {fields.get('name')!r}: {problems}") from exc


def _error_message(error: Mapping[str, Any]) -> str:
    cause = (error.get("ctx") or {}).get("error")
    return str(cause) if isinstance(cause, Exception) else str(error["msg"])


def check_service(spec: ScheduleSpec, settings: Settings) -> None:
    """ConfigurationError unless the spec's service is one the settings know."""
    settings.service_config(spec.service)


def next_run_at(schedule: Any, last_run_at: datetime | None, now: datetime) -> datetime | None:
    """When a celery schedule last run at `last_run_at` is next due, seen at aware `now` (None: never again).

    The answer `schedule list` shows and the score of a schedule's redbeat entry (`BeatEntry`): redbeat's own
    `due_at` drifts earlier as time passes.
    """
    if now.tzinfo is None:
        raise ValueError(f"now must be timezone-aware, got {now!r}")
    if last_run_at is None:
        return now  # never run: due at once, as redbeat's is_due has it
    # remaining_estimate(last_run_at) is the time from the schedule's clock (not from last_run_at) to the next event
    # after last_run_at: redbeat adds it to last_run_at, which drifts earlier as the clock runs. Read it at `now`.
    remaining: timedelta | None = _clock_at(schedule, now).remaining_estimate(last_run_at)
    if remaining is None:
        return None
    return now + max(remaining, timedelta(0))


def _clock_at(schedule: Any, now: datetime) -> Any:
    """A copy of a celery schedule whose clock reads `now` (copy.copy would drop its app, hence its timezone)."""
    pinned = object.__new__(type(schedule))
    pinned.__dict__.update(schedule.__dict__, nowfun=lambda: now)
    return pinned
