"""Schedules: "score new images in container C, prefix P, with service S, every 1h", kept in Redis.

Each schedule is two things in the jobs Redis (`Settings.jobs_url`), both under `Settings.key_prefix`
(`<queue>:<namespace>:`) so two deployments sharing a Redis never see each other's schedules:

* a celery-redbeat entry (`...:redbeat:<name>`): what `blobscore beat` fires, when. Its task is
  `blobscore.scheduled_run` and its one argument is the spec as a JSON dict (names, never a key or secret);
* our own record (`...:schedule:<name>` and a few small companions): the spec, where it came from (`cli` or
  `config`), the last run (time, job id, counts), the run history and the jobs still in flight.

Schedules declared in the config file (`[schedules.NAME]` tables with container, prefix, service and cron or every)
are written into Redis when `blobscore beat` starts (`sync_config`): added or updated, and a schedule that came from
the config file and is no longer in it is removed. Schedules added with `blobscore schedule add` are never touched by
that sync (a config table of the same name takes them over). Give that Redis persistence (appendonly) and schedules
survive restarts of Redis as well as of beat.

Cron expressions are evaluated in UTC. A new schedule first fires one interval after it was added (cron: at the next
matching minute); `blobscore schedule run NAME` runs it now. `blobscore schedule add` refuses a container the storage
account does not have.

When a schedule is next due is `next_run_at`'s answer, for `schedule list` and for the score of its redbeat entry
(`BeatEntry`): redbeat's own `due_at` drifts earlier as time passes (see `next_run_at`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import redis
from celery import Celery
from celery.schedules import crontab
from celery.schedules import schedule as interval_schedule
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from redbeat.schedulers import RedBeatSchedulerEntry, ensure_conf

from worker.celery_app import celery_config
from worker.deployment import AccountRef
from worker.errors import BlobscoreError
from worker.jobs import JobSpec, JobState
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.storage import BlobStore

log = logging.getLogger(__name__)

SCHEDULED_RUN_TASK = "blobscore.scheduled_run"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
# How often beat looks at the schedule (seconds): new and changed schedules are seen this quickly, and a
# standby beat checks the lock this often.
BEAT_MAX_LOOP_INTERVAL_S = 1.0
# The beat lock expires this long after its holder stopped renewing it (a killed beat): then a standby beat takes
# over. The holder renews it on every loop, so this only has to exceed a loop plus a Redis hiccup.
BEAT_LOCK_TIMEOUT_S = 10
# The per-schedule run lock lives this long unless renewed; its holder renews it every third of that.
RUN_LOCK_TTL_S = 30.0
# An unfinished run older than this no longer keeps its images out of later runs (`blobscore reconcile` it).
STALE_RUN_S = 24 * 3600.0
# Run history kept per schedule.
HISTORY_LENGTH = 200
# A cron run's message is dropped if no consumer took it within this long (the next tick fires anyway).
CRON_RUN_EXPIRES_S = 60.0

Origin = Literal["cli", "config"]
_EVERY_PART = re.compile(r"(\d+)\s*([smhd])")
_EVERY_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class InvalidScheduleError(BlobscoreError):
    """A schedule that cannot work: bad name, interval, cron expression or missing fields."""


class UnknownScheduleError(BlobscoreError):
    """No schedule with that name."""


class UnknownContainerError(BlobscoreError):
    """The schedule's container does not exist in the storage account."""


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
    """What a schedule scores, with which service, and when: `cron` or `every`, exactly one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    container: str = Field(min_length=1)
    prefix: str = ""
    service: str = Field(min_length=1)
    cron: str | None = None
    every: str | None = None
    results_container: str | None = None
    results_prefix: str | None = None

    @field_validator("cron")
    @classmethod
    def _cron_parses(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parse_cron(value)
        except InvalidScheduleError as exc:
            raise ValueError(str(exc)) from exc
        return " ".join(value.split())

    @field_validator("every")
    @classmethod
    def _every_parses(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parse_every(value)
        except InvalidScheduleError as exc:
            raise ValueError(str(exc)) from exc
        return value.strip().lower().replace(" ", "")

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
        """The JSON-able argument of the scheduled run task."""
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


def next_run_at(schedule: Any, last_run_at: datetime | None, now: datetime) -> datetime | None:
    """When a celery schedule last run at `last_run_at` is next due, seen at aware `now` (None: never again)."""
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


class BeatEntry(RedBeatSchedulerEntry):  # type: ignore[misc]
    """redbeat's entry due at `next_run_at`: its score in redbeat's zset does not drift earlier."""

    @property
    def due_at(self) -> datetime | None:
        """When the entry is next due (now if it never ran)."""
        return next_run_at(self.schedule, self.last_run_at, self._default_now())


def schedules_from_config(path: Path) -> dict[str, ScheduleSpec]:
    """The `[schedules.NAME]` tables of a config file (none when the file does not exist)."""
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


def schedules_queue(settings: Settings) -> str:
    """The queue `blobscore beat` consumes scheduled runs from (never a service's image queue)."""
    return f"{settings.queue}.{settings.namespace_in_use}:schedules"


def namespace(settings: Settings) -> str:
    """The Redis key prefix of this deployment's schedules."""
    return settings.key_prefix


def schedules_app(settings: Settings) -> Celery:
    """A Celery app for scheduled runs: the image queue's settings plus redbeat's, runs on their own queue."""
    app = Celery("blobscore-schedules")
    app.conf.update(celery_config(settings))
    app.conf.update({
        "task_default_queue": schedules_queue(settings),
        # A scheduled run lists and publishes: no deadline of its own, and a redelivery after a crash is not
        # needed (the next tick runs it again), so it is acked when it starts.
        "task_soft_time_limit": None,
        "task_time_limit": None,
        "task_acks_late": False,
        # No result backend, and no default `celery.backend_cleanup` entry in the schedule.
        "result_expires": None,
        "timezone": "UTC",
        "enable_utc": True,
        "beat_max_loop_interval": BEAT_MAX_LOOP_INTERVAL_S,
        "redbeat_redis_url": settings.jobs_url,
        "redbeat_redis_options": {"socket_timeout": 10, "socket_connect_timeout": 5, "health_check_interval": 30},
        "redbeat_key_prefix": f"{namespace(settings)}redbeat:",
        "redbeat_lock_timeout": BEAT_LOCK_TIMEOUT_S,
    })
    return app


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunRecord:
    """One finished run of a schedule."""

    job_id: str | None
    started_at: float
    finished_at: float
    listed: int
    skipped_current: int
    excluded_in_flight: int
    trigger: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able view."""
        return {"job_id": self.job_id, "started_at": _iso(self.started_at), "finished_at": _iso(self.finished_at),
                "listed": self.listed, "skipped_current": self.skipped_current,
                "excluded_in_flight": self.excluded_in_flight, "trigger": self.trigger}

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        """Parse what `to_json` wrote."""
        raw = json.loads(text)
        return cls(raw["job_id"], float(raw["started_at"]), float(raw["finished_at"]), int(raw["listed"]),
                   int(raw["skipped_current"]), int(raw["excluded_in_flight"]), str(raw["trigger"]))

    def to_json(self) -> str:
        """Stored form (timestamps as floats)."""
        return json.dumps({"job_id": self.job_id, "started_at": self.started_at, "finished_at": self.finished_at,
                           "listed": self.listed, "skipped_current": self.skipped_current,
                           "excluded_in_flight": self.excluded_in_flight, "trigger": self.trigger})


@dataclass(frozen=True)
class ScheduleInfo:
    """A schedule as `blobscore schedule list` shows it."""

    spec: ScheduleSpec
    origin: Origin
    last_run: RunRecord | None
    runs: int
    next_run_at: float | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able view: the spec, the last run (with its job id) and the next run."""
        return {
            **self.spec.to_args(), "when": self.spec.when, "origin": self.origin, "runs": self.runs,
            "last_run_at": _iso(self.last_run.started_at) if self.last_run else None,
            "last_job_id": self.last_run.job_id if self.last_run else None,
            "last_run": self.last_run.to_dict() if self.last_run else None,
            "next_run_at": _iso(self.next_run_at),
        }


@dataclass(frozen=True)
class SyncReport:
    """What syncing the config file's schedules changed."""

    added: list[str]
    updated: list[str]
    unchanged: list[str]
    removed: list[str]


class ScheduleStore:
    """Schedules in Redis: redbeat entries (what beat fires) plus our records (spec, runs, jobs in flight)."""

    def __init__(self, app: Celery, client: redis.Redis, prefix: str) -> None:
        """`app` carries the redbeat configuration; `client` (decode_responses=True) holds our records."""
        ensure_conf(app)
        self._app = app
        self._redis = client
        self._prefix = prefix

    @classmethod
    def from_settings(cls, settings: Settings, app: Celery | None = None) -> ScheduleStore:
        """A store on the settings' jobs Redis (its own connection pool)."""
        client = redis.Redis.from_url(settings.jobs_url, decode_responses=True, health_check_interval=30,
                                      socket_timeout=10, socket_connect_timeout=5)
        return cls(app or schedules_app(settings), client, namespace(settings))

    @property
    def redis(self) -> redis.Redis:
        """The client of our records."""
        return self._redis

    def close(self) -> None:
        """Release our connection pool."""
        self._redis.close()

    # Keys.
    def _index(self) -> str:
        return f"{self._prefix}schedules"

    def _record(self, name: str) -> str:
        return f"{self._prefix}schedule:{name}"

    def _history(self, name: str) -> str:
        return f"{self._prefix}schedule:{name}:runs"

    def _active(self, name: str) -> str:
        return f"{self._prefix}schedule:{name}:active"

    def _run_lock(self, name: str) -> str:
        return f"{self._prefix}schedule:{name}:run-lock"

    # Schedules.
    def add(self, spec: ScheduleSpec, origin: Origin = "cli") -> bool:
        """Create or replace the schedule; True if it is new. A replaced schedule keeps its timing and history."""
        now = time.time()
        record = self._record(spec.name)
        new = not self._redis.exists(record)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(record, mapping={"spec": spec.model_dump_json(), "origin": origin, "updated_at": now})
        pipe.hsetnx(record, "created_at", now)
        pipe.sadd(self._index(), spec.name)
        pipe.execute()
        entry = BeatEntry(
            name=spec.name, task=SCHEDULED_RUN_TASK, schedule=spec.celery_schedule(), args=[spec.to_args()],
            options={"queue": _runs_queue(self._app), "expires": spec.run_expires_s()},
            app=self._app,
        )
        previous = self._beat_entry(spec.name)
        if previous is not None and previous.last_run_at is not None:
            entry.last_run_at = previous.last_run_at  # keep its timing: save() scores it from last_run_at
        entry.save()
        return new

    def get(self, name: str) -> ScheduleSpec:
        """The schedule's spec (UnknownScheduleError if there is none)."""
        raw = self._redis.hget(self._record(name), "spec")
        if raw is None:
            raise UnknownScheduleError(f"no schedule {name!r}")
        return ScheduleSpec.model_validate_json(str(raw))

    def exists(self, name: str) -> bool:
        """Whether the schedule exists."""
        return bool(self._redis.sismember(self._index(), name))

    def names(self) -> list[str]:
        """Every schedule's name, sorted."""
        return sorted(str(name) for name in self._redis.smembers(self._index()))

    def origin(self, name: str) -> Origin:
        """Where the schedule came from: `cli` or `config`."""
        return "config" if self._redis.hget(self._record(name), "origin") == "config" else "cli"

    def remove(self, name: str) -> bool:
        """Delete the schedule, its run history and its beat entry (not its jobs); False if there was none."""
        existed = self.exists(name)
        BeatEntry(name=name, app=self._app).delete()
        self._redis.delete(self._record(name), self._history(name), self._active(name))
        self._redis.srem(self._index(), name)
        return existed

    def info(self, name: str) -> ScheduleInfo:
        """The spec with its last and next run."""
        spec = self.get(name)
        runs = self._redis.hget(self._record(name), "runs")
        entry = self._beat_entry(name)
        due = next_run_at(entry.schedule, entry.last_run_at, datetime.now(UTC)) if entry is not None else None
        return ScheduleInfo(spec, self.origin(name), self.last_run(name), int(str(runs or 0)),
                            due.timestamp() if due is not None else None)

    def infos(self) -> list[ScheduleInfo]:
        """Every schedule with its last and next run."""
        found = []
        for name in self.names():
            try:
                found.append(self.info(name))
            except UnknownScheduleError:
                continue  # removed meanwhile
        return found

    def _beat_entry(self, name: str) -> Any:
        try:
            return BeatEntry.from_key(BeatEntry.generate_key(self._app, name), app=self._app)
        except KeyError:
            return None

    def sync_config(self, specs: Mapping[str, ScheduleSpec]) -> SyncReport:
        """Write the config file's schedules into Redis; drop config schedules no longer declared."""
        added: list[str] = []
        updated: list[str] = []
        unchanged: list[str] = []
        removed: list[str] = []
        for name, spec in sorted(specs.items()):
            try:
                current: ScheduleSpec | None = self.get(name)
            except UnknownScheduleError:
                current = None
            if current == spec and self.origin(name) == "config" and self._beat_entry(name) is not None:
                unchanged.append(name)
                continue
            (added if self.add(spec, origin="config") else updated).append(name)
        for name in self.names():
            if name not in specs and self.origin(name) == "config":
                self.remove(name)
                removed.append(name)
        return SyncReport(added, updated, unchanged, removed)

    # Runs.
    def last_run(self, name: str) -> RunRecord | None:
        """The latest finished run."""
        raw = self._redis.lindex(self._history(name), 0)
        return RunRecord.from_json(str(raw)) if raw is not None else None

    def history(self, name: str) -> list[RunRecord]:
        """Recent runs, newest first."""
        raw = self._redis.lrange(self._history(name), 0, -1)
        return [RunRecord.from_json(str(item)) for item in raw]

    def record_run(self, name: str, run: RunRecord) -> None:
        """Record a finished run as the schedule's last; its job counts as in flight until it is done."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.lpush(self._history(name), run.to_json())
        pipe.ltrim(self._history(name), 0, HISTORY_LENGTH - 1)
        pipe.hincrby(self._record(name), "runs", 1)
        if run.job_id is not None and run.listed > 0:
            pipe.hset(self._active(name), run.job_id, run.started_at)
        pipe.execute()

    def active_jobs(self, name: str) -> dict[str, float]:
        """The schedule's jobs that may still be in flight, with when their runs started."""
        raw: dict[str, str] = self._redis.hgetall(self._active(name))  # type: ignore[assignment]
        return {job_id: float(started) for job_id, started in raw.items()}

    def drop_active(self, name: str, job_ids: list[str]) -> None:
        """Forget jobs that are no longer in flight."""
        if job_ids:
            self._redis.hdel(self._active(name), *job_ids)

    @contextmanager
    def run_lock(self, name: str, ttl_s: float = RUN_LOCK_TTL_S) -> Iterator[bool]:
        """Hold the schedule's run lock for the block (yields False, holding nothing, if a run holds it).

        The lock expires `ttl_s` after its holder died; while the block runs a thread renews it.
        """
        lock = self._redis.lock(self._run_lock(name), timeout=ttl_s, blocking=False, thread_local=False)
        if not lock.acquire(blocking=False):
            yield False
            return
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(ttl_s / 3):
                try:
                    lock.reacquire()
                except redis.exceptions.LockError:
                    log.warning("schedule %s: lost its run lock", name)
                    return
                except redis.RedisError as exc:
                    log.warning("schedule %s: could not renew its run lock: %s", name, exc)

        renewer = threading.Thread(target=renew, name=f"run-lock-{name}", daemon=True)
        renewer.start()
        try:
            yield True
        finally:
            stop.set()
            renewer.join(timeout=5)
            try:
                lock.release()
            except redis.exceptions.LockError:
                log.warning("schedule %s: its run lock had expired before the run ended", name)


def _runs_queue(app: Celery) -> str:
    # The queue scheduled runs go to, as `schedules_app` configured it.
    return str(app.conf.task_default_queue)


def triage_active(
    states: Mapping[str, JobState | None], started: Mapping[str, float], now: float, stale_after_s: float = STALE_RUN_S
) -> tuple[list[str], list[str]]:
    """Split a schedule's in-flight jobs into (still shielding their images, to forget).

    Called under the schedule's run lock. `done` jobs are finished; a job whose record is gone (None) is forgotten;
    a job still `listing` belongs to a run that died mid-listing (no live run can hold it: we hold the lock), so it
    shields nothing (its queued images, if any, find their result already written and are not scored twice); a
    `running` job older than `stale_after_s` is assumed stuck and no longer shields its images.
    """
    shielding, forget = [], []
    for job_id, state in sorted(states.items()):
        if state == "running" and now - started.get(job_id, now) < stale_after_s:
            shielding.append(job_id)
        else:
            forget.append(job_id)
    return shielding, forget


def unfinished_images(listed: set[str], ok: set[str], rejected: set[str]) -> set[str]:
    """A job's images still queued or retrying: listed, with no outcome yet."""
    return listed - ok - rejected
