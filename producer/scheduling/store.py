"""Schedules in Redis: specs and beat entries, run records, and the per-schedule run lock; Redis errors become ours."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import redis
from celery import Celery
from redbeat.schedulers import ensure_conf

from producer.scheduling.app import SCHEDULED_RUN_TASK, BeatEntry, namespace, runs_queue, schedules_app
from producer.scheduling.spec import ScheduleSpec, next_run_at
from worker.errors import BlobscoreError
from worker.redis_client import open_redis, translated
from worker.settings import Settings

log = logging.getLogger(__name__)

# The per-schedule run lock lives this long unless renewed; its holder renews it every third of that.
RUN_LOCK_TTL_S = 30.0
# Run history kept per schedule.
HISTORY_LENGTH = 200

Origin = Literal["cli", "config"]


class UnknownScheduleError(BlobscoreError):
    """No schedule with that name."""


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
    """Schedules in Redis: redbeat entries (what beat fires) plus our records (spec, runs, jobs in flight).

    Each schedule is two things in the jobs Redis (`Settings.jobs_url`), both under `Settings.key_prefix`
    (`<queue>:<namespace>:`) so two deployments sharing a Redis never see each other's schedules: a celery-redbeat
    entry (`...:redbeat:<name>`), what `blobscore beat` fires and when, whose task is `blobscore.scheduled_run` with
    the spec as its one argument; and our own record (`...:schedule:<name>` and a few small companions): the spec,
    where it came from (`cli` or `config`), the last run, the run history and the jobs still in flight. Give that
    Redis persistence (appendonly) and schedules survive restarts of Redis as well as of beat.

    Every Redis failure is ours: TransientError when Redis is unreachable or timed out, BlobscoreError otherwise.
    """

    def __init__(self, app: Celery, client: redis.Redis, prefix: str) -> None:
        """`app` carries the redbeat configuration; `client` (decode_responses=True) holds our records."""
        ensure_conf(app)
        self._app = app
        self._redis = client
        self._prefix = prefix

    @classmethod
    def from_settings(cls, settings: Settings, app: Celery | None = None) -> ScheduleStore:
        """A store on the settings' jobs Redis (its own connection pool)."""
        return cls(app or schedules_app(settings), open_redis(settings.jobs_url), namespace(settings))

    def close(self) -> None:
        """Release our connection pool."""
        with translated("close the schedule store"):
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
        with translated(f"add schedule {spec.name}"):
            new = not self._redis.exists(record)
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(record, mapping={"spec": spec.model_dump_json(), "origin": origin, "updated_at": now})
            pipe.hsetnx(record, "created_at", now)
            pipe.sadd(self._index(), spec.name)
            pipe.execute()
            entry = BeatEntry(
                name=spec.name, task=SCHEDULED_RUN_TASK, schedule=spec.celery_schedule(), args=[spec.to_args()],
                options={"queue": runs_queue(self._app), "expires": spec.run_expires_s()},
                app=self._app,
            )
            previous = self._beat_entry(spec.name)
            if previous is not None and previous.last_run_at is not None:
                entry.last_run_at = previous.last_run_at  # keep its timing: save() scores it from last_run_at
            entry.save()
        return new

    def get(self, name: str) -> ScheduleSpec:
        """The schedule's spec (UnknownScheduleError if there is none)."""
        with translated(f"read schedule {name}"):
            raw = self._redis.hget(self._record(name), "spec")
        if raw is None:
            raise UnknownScheduleError(f"no schedule {name!r}")
        return ScheduleSpec.model_validate_json(str(raw))

    def exists(self, name: str) -> bool:
        """Whether the schedule exists."""
        with translated(f"read schedule {name}"):
            return bool(self._redis.sismember(self._index(), name))

    def names(self) -> list[str]:
        """Every schedule's name, sorted."""
        with translated("list schedules"):
            return sorted(str(name) for name in self._redis.smembers(self._index()))

    def origin(self, name: str) -> Origin:
        """Where the schedule came from: `cli` or `config`."""
        with translated(f"read schedule {name}"):
            return "config" if self._redis.hget(self._record(name), "origin") == "config" else "cli"

    def remove(self, name: str) -> bool:
        """Delete the schedule, its run history and its beat entry (not its jobs); False if there was none."""
        existed = self.exists(name)
        with translated(f"remove schedule {name}"):
            BeatEntry(name=name, app=self._app).delete()
            self._redis.delete(self._record(name), self._history(name), self._active(name))
            self._redis.srem(self._index(), name)
        return existed

    def info(self, name: str) -> ScheduleInfo:
        """The spec with its last and next run."""
        spec = self.get(name)
        with translated(f"read schedule {name}"):
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
            with translated(f"read the beat entry of schedule {name}"):
                return BeatEntry.from_key(BeatEntry.generate_key(self._app, name), app=self._app)
        except KeyError:
            return None

    def sync_config(self, specs: Mapping[str, ScheduleSpec]) -> SyncReport:
        """Write the config file's schedules into Redis: added or updated, and a schedule that came from the config
        file and is no longer in it removed. Schedules added with the CLI are left alone (a config table of the same
        name takes them over)."""
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
        with translated(f"read the runs of schedule {name}"):
            raw = self._redis.lindex(self._history(name), 0)
        return RunRecord.from_json(str(raw)) if raw is not None else None

    def history(self, name: str) -> list[RunRecord]:
        """Recent runs, newest first."""
        with translated(f"read the runs of schedule {name}"):
            raw = self._redis.lrange(self._history(name), 0, -1)
        return [RunRecord.from_json(str(item)) for item in raw]

    def record_run(self, name: str, run: RunRecord) -> None:
        """Record a finished run as the schedule's last; its job counts as in flight until it is done."""
        with translated(f"record a run of schedule {name}"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.lpush(self._history(name), run.to_json())
            pipe.ltrim(self._history(name), 0, HISTORY_LENGTH - 1)
            pipe.hincrby(self._record(name), "runs", 1)
            if run.job_id is not None and run.listed > 0:
                pipe.hset(self._active(name), run.job_id, run.started_at)
            pipe.execute()

    def active_jobs(self, name: str) -> dict[str, float]:
        """The schedule's jobs that may still be in flight, with when their runs started."""
        with translated(f"read the jobs in flight of schedule {name}"):
            raw: dict[str, str] = self._redis.hgetall(self._active(name))  # type: ignore[assignment]
        return {job_id: float(started) for job_id, started in raw.items()}

    def drop_active(self, name: str, job_ids: list[str]) -> None:
        """Forget jobs that are no longer in flight."""
        if job_ids:
            with translated(f"forget finished jobs of schedule {name}"):
                self._redis.hdel(self._active(name), *job_ids)

    @contextmanager
    def run_lock(self, name: str, ttl_s: float = RUN_LOCK_TTL_S) -> Iterator[bool]:
        """Hold the schedule's run lock for the block (yields False, holding nothing, if a run holds it).

        The lock expires `ttl_s` after its holder died; while the block runs a thread renews it.
        """
        lock = self._redis.lock(self._run_lock(name), timeout=ttl_s, blocking=False, thread_local=False)
        with translated(f"take the run lock of schedule {name}"):
            acquired = lock.acquire(blocking=False)
        if not acquired:
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
            with translated(f"release the run lock of schedule {name}"):
                try:
                    lock.release()
                except redis.exceptions.LockError:
                    log.warning("schedule %s: its run lock had expired before the run ended", name)
