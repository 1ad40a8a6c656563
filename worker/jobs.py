"""Job records in Redis (JobStore): create a job, record its listing pages and outcomes, read its status back.

Every count is exact and cheap at any size thanks to the compact layout of worker/job_records.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import redis

from worker.deployment import AccountRef, Deployment
from worker.errors import BlobscoreError
from worker.job_records import (
    BUMP_GENERATION,
    RECORD_OUTCOME,
    RECORD_PAGE,
    RELEASE_STEP_LOCK,
    bit_is_set,
    pack_names,
    unpack_names,
)
from worker.redis_client import open_redis, translated
from worker.settings import Settings

Outcome = Literal["ok", "rejected"]
JobState = Literal["listing", "running", "done"]
Part = Literal["listed", "ok", "rejected", "retrying"]
# An error message kept in a job record is cut to this many characters.
MAX_ERROR_MESSAGE = 500


@dataclass(frozen=True)
class JobSpec:
    """What a job scores and where its results go."""

    container: str
    prefix: str
    service: str
    results_container: str
    results_prefix: str


@dataclass(frozen=True)
class JobStatus:
    """A job's counts; `pending` = listed - ok - rejected."""

    job_id: str
    listed: int
    ok: int
    rejected: int
    retrying: int
    pending: int
    state: JobState


@dataclass(frozen=True)
class JobError:
    """The latest error of one kind that held a job's images back: what, where, how often, since when."""

    reason: str
    service: str
    message: str
    count: int
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class ListingProgress:
    """Where a job's listing stands: the continuation token after the last published page."""

    continuation: str | None
    next_index: int
    next_page: int
    done: bool


class UnknownJobError(BlobscoreError):
    """No job with that id."""


def new_job_id() -> str:
    """A sortable, unique job id: creation time then randomness."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


class JobStore:
    """Job records: each listed image has an index; its outcome is a bit, counted once however often recorded.

    Every key starts with the deployment's prefix (`Settings.key_prefix`): deployments sharing a Redis never
    read or count each other's jobs.
    """

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self._redis = client
        self._prefix = f"{key_prefix}job:"
        self._record_outcome = client.register_script(RECORD_OUTCOME)
        self._record_page = client.register_script(RECORD_PAGE)
        self._bump_generation = client.register_script(BUMP_GENERATION)
        self._release_step_lock = client.register_script(RELEASE_STEP_LOCK)

    @classmethod
    def from_url(cls, url: str, key_prefix: str) -> JobStore:
        """A store over its own connection pool."""
        return cls(open_redis(url), key_prefix)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        """The store of the settings' deployment, over its own connection pool."""
        return cls.from_url(settings.jobs_url, settings.key_prefix)

    def close(self) -> None:
        """Release the connection pool."""
        self._redis.close()

    @property
    def client(self) -> redis.Redis:
        """The Redis client underneath (for reads next to the job's, such as queue presence)."""
        return self._redis

    def create(
        self, spec: JobSpec, origin: Deployment, job_id: str | None = None, extra: Mapping[Any, Any] = {}
    ) -> str:
        """Record a new job of deployment `origin` in the `listing` state and return its id; `extra` fields are the
        listing carrier's (window, limit, page size)."""
        job_id = job_id or new_job_id()
        with translated(f"create job {job_id}"):
            self._redis.hset(
                self._key(job_id),
                mapping={
                    "container": spec.container, "prefix": spec.prefix, "service": spec.service,
                    "results_container": spec.results_container, "results_prefix": spec.results_prefix,
                    "namespace": origin.namespace, "account": origin.account.name,
                    "endpoint": origin.account.endpoint,
                    "listed": 0, "ok": 0, "rejected": 0, "pages": 0, "next_index": 0, "next_page": 0,
                    "continuation": "", "listing_done": 0, "created_at": time.time(), "listing_gen": 0, **extra,
                },
            )
        return job_id

    def spec(self, job_id: str) -> JobSpec:
        """What the job scores."""
        record = self._record(job_id)
        return JobSpec(
            record["container"], record["prefix"], record["service"],
            record["results_container"], record["results_prefix"],
        )

    def origin(self, job_id: str) -> Deployment:
        """The deployment (namespace and storage account) the job was listed from."""
        record = self._record(job_id)
        account = AccountRef(name=record.get("account", ""), endpoint=record.get("endpoint", ""))
        return Deployment(namespace=record.get("namespace", ""), account=account)

    def progress(self, job_id: str) -> ListingProgress:
        """Where the listing stands, to resume it."""
        record = self._record(job_id)
        return ListingProgress(
            continuation=record.get("continuation") or None,
            next_index=int(record.get("next_index", 0)),
            next_page=int(record.get("next_page", 0)),
            done=record.get("listing_done") == "1",
        )

    def record_page(self, job_id: str, page: int, first_index: int, names: list[str]) -> None:
        """Store a page of names at its indices and count them as listed — before its tasks are published."""
        with translated(f"record page {page} of job {job_id}"):
            self._record_page(
                keys=[self._key(job_id), self._key(job_id, f"page:{page}:{first_index}")],
                args=[first_index + len(names), page + 1, pack_names(names)],
            )

    def advance(
        self, job_id: str, continuation: str | None, next_index: int, next_page: int,
        extra: Mapping[Any, Any] = {},
    ) -> None:
        """The pages so far are published: a resumed listing continues after them (with `extra` carrier state, in
        the same write, so the two never disagree after a crash)."""
        with translated(f"advance job {job_id}"):
            self._redis.hset(
                self._key(job_id),
                mapping={"continuation": continuation or "", "next_index": next_index, "next_page": next_page,
                         **extra},
            )

    def fields(self, job_id: str) -> dict[str, str]:
        """The job record as stored (for the listing carrier's own fields)."""
        return self._record(job_id)

    def bump_listing_generation(self, job_id: str, expected: int) -> bool:
        """Move the listing to the next step if it is still at `expected` (one carrier chain per job survives)."""
        with translated(f"advance the listing of job {job_id}"):
            return bool(self._bump_generation(keys=[self._key(job_id)], args=[expected]))

    def take_step_lock(self, job_id: str, token: str, ttl_s: int) -> bool:
        """Hold the job's listing-step lock for `ttl_s` at most (one step at a time); False while another holds it."""
        with translated(f"lock the listing of job {job_id}"):
            return bool(self._redis.set(self._key(job_id, "step-lock"), token, nx=True, ex=ttl_s))

    def release_step_lock(self, job_id: str, token: str) -> None:
        """Let the next step in, if the lock is still `token`'s (a no-op after it expired or was released)."""
        with translated(f"unlock the listing of job {job_id}"):
            self._release_step_lock(keys=[self._key(job_id, "step-lock")], args=[token])

    def exclude(self, job_id: str, names: Collection[str]) -> None:
        """Names the listing must not queue (a scheduled run's images still in flight from earlier runs)."""
        if names:
            with translated(f"record exclusions of job {job_id}"):
                self._redis.sadd(self._key(job_id, "exclude"), *names)

    def excluded(self, job_id: str, names: list[str]) -> set[str]:
        """Which of `names` the listing must not queue."""
        if not names:
            return set()
        with translated(f"read exclusions of job {job_id}"):
            flags = self._redis.smismember(self._key(job_id, "exclude"), names)
        return {name for name, flag in zip(names, flags, strict=True) if flag}

    def finish_listing(self, job_id: str) -> None:
        """Mark the listing complete: from now on the job can become `done`."""
        with translated(f"finish listing of job {job_id}"):
            self._redis.hset(self._key(job_id), "listing_done", 1)

    def record_outcome(self, job_id: str, index: int, blob: str, outcome: Outcome) -> None:
        """Count the image's final outcome once, however often it is recorded."""
        with translated(f"record outcome in job {job_id}"):
            self._record_outcome(
                keys=[self._key(job_id, outcome), self._key(job_id, _other(outcome)), self._key(job_id),
                      self._key(job_id, "retrying")],
                args=[index, outcome, blob],
            )

    def record_retry(self, job_id: str, blob: str) -> None:
        """Mark the image as waiting on a retry (a small set: only images in trouble are in it)."""
        with translated(f"record retry in job {job_id}"):
            self._redis.sadd(self._key(job_id, "retrying"), blob)

    def record_error(self, job_id: str, reason: str, service: str, message: str) -> None:
        """Note an error that holds an image back (one small hash per job: a field set per kind of error)."""
        key, now = self._key(job_id, "errors"), time.time()
        with translated(f"record error in job {job_id}"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hincrby(key, f"{reason}:count", 1)
            pipe.hsetnx(key, f"{reason}:first", now)
            pipe.hset(key, mapping={f"{reason}:last": now, f"{reason}:service": service,
                                    f"{reason}:message": message[:MAX_ERROR_MESSAGE]})
            pipe.execute()

    def errors(self, job_id: str) -> list[JobError]:
        """The errors that held the job's images back, most recent first."""
        with translated(f"read errors of job {job_id}"):
            fields: dict[str, str] = self._redis.hgetall(self._key(job_id, "errors"))  # type: ignore[assignment]
        reasons = {name.rsplit(":", 1)[0] for name in fields}
        found = [
            JobError(reason, fields.get(f"{reason}:service", ""), fields.get(f"{reason}:message", ""),
                     int(fields.get(f"{reason}:count", 0)), float(fields.get(f"{reason}:first", 0)),
                     float(fields.get(f"{reason}:last", 0)))
            for reason in reasons
        ]
        return sorted(found, key=lambda error: error.last_seen, reverse=True)

    def status(self, job_id: str) -> JobStatus:
        """The job's counts and state."""
        record = self._record(job_id)
        with translated(f"status of job {job_id}"):
            retrying = int(self._redis.scard(self._key(job_id, "retrying")))
        listed, ok, rejected = (int(record.get(field, 0)) for field in ("listed", "ok", "rejected"))
        finished = ok + rejected
        state: JobState = "running"
        if record.get("listing_done") != "1":
            state = "listing"
        elif finished >= listed:
            state = "done"
        return JobStatus(job_id, listed, ok, rejected, retrying, max(listed - finished, 0), state)

    def finished_count(self, job_id: str) -> int:
        """ok + rejected: how much of the window the workers have drained."""
        with translated(f"read job {job_id}"):
            ok, rejected = self._redis.hmget(self._key(job_id), ["ok", "rejected"])
        return int(ok or 0) + int(rejected or 0)

    def listed_pages(self, job_id: str) -> Iterator[tuple[int, list[str]]]:
        """(first index, names) of every recorded listing page."""
        pattern = self._key(job_id, "page:*")
        with translated(f"read pages of job {job_id}"):
            keys = sorted(self._redis.scan_iter(match=pattern, count=1000), key=_page_order)
            for key in keys:
                packed = self._get_bytes(key)
                if packed:
                    yield _page_order(key), unpack_names(packed)

    def outcome_bits(self, job_id: str, outcome: Outcome) -> bytes:
        """The job's bitmap of images counted with `outcome` (bit i = image index i)."""
        with translated(f"read job {job_id}"):
            return self._get_bytes(self._key(job_id, outcome))

    def _get_bytes(self, key: str) -> bytes:
        # The client decodes replies to str; packed pages and bitmaps are binary.
        value = self._redis.execute_command("GET", key, NEVER_DECODE=True)  # type: ignore[no-untyped-call]
        return bytes(value or b"")

    def members(self, job_id: str, part: Part) -> Iterator[str]:
        """The blob names listed, counted ok, counted rejected, or waiting on a retry."""
        if part == "retrying":
            with translated(f"read job {job_id}"):
                yield from self._redis.sscan_iter(self._key(job_id, "retrying"), count=1000)
            return
        bits = None if part == "listed" else self.outcome_bits(job_id, part)
        for first, names in self.listed_pages(job_id):
            for offset, name in enumerate(names):
                if bits is None or bit_is_set(bits, first + offset):
                    yield name

    def _key(self, job_id: str, part: str | None = None) -> str:
        return f"{self._prefix}{job_id}" if part is None else f"{self._prefix}{job_id}:{part}"

    def _record(self, job_id: str) -> dict[str, str]:
        with translated(f"read job {job_id}"):
            record: dict[str, str] = self._redis.hgetall(self._key(job_id))  # type: ignore[assignment]
        if not record:
            raise UnknownJobError(self._not_here(job_id))
        return record

    def _not_here(self, job_id: str) -> str:
        """Why a job is unknown: never created, or created by another deployment sharing this Redis."""
        here = self._prefix.removesuffix("job:").rstrip(":")
        with translated(f"look for job {job_id}"):
            for key in self._redis.scan_iter(match=f"*:job:{job_id}", count=1000):
                other: list[str | None] = self._redis.hmget(key, ["namespace", "account", "endpoint"])  # type: ignore[assignment]
                namespace, account, endpoint = (value or "?" for value in other)
                return (
                    f"job {job_id} belongs to another deployment: namespace {namespace} (storage account {account} "
                    f"at {endpoint}), not {here}; run this command with that deployment's settings"
                )
        return f"no job {job_id!r} in this deployment ({here})"


def _other(outcome: Outcome) -> Outcome:
    return "rejected" if outcome == "ok" else "ok"


def _page_order(key: object) -> int:
    return int(str(key).rsplit(":", 1)[1])
