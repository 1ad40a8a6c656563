"""Job records and per-image outcome counters in Redis; redis-py errors become ours."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import redis

from worker.errors import BlobscoreError, TransientError

KEY_PREFIX = "blobscore:job:"
Outcome = Literal["ok", "rejected"]
JobState = Literal["listing", "running", "done"]


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


class UnknownJobError(BlobscoreError):
    """No job with that id."""


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except redis.ConnectionError as exc:
        raise TransientError(f"{what}: Redis unreachable") from exc
    except redis.TimeoutError as exc:
        raise TransientError(f"{what}: Redis timed out") from exc
    except redis.RedisError as exc:
        raise BlobscoreError(f"{what}: {exc}") from exc


def new_job_id() -> str:
    """A sortable, unique job id: creation time then randomness."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


class JobStore:
    """Job records: a hash per job plus one set per outcome, so counting an image twice is impossible."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        """A store over its own connection pool."""
        return cls(redis.Redis.from_url(url, decode_responses=True, health_check_interval=30))

    def close(self) -> None:
        """Release the connection pool."""
        self._redis.close()

    def create(self, spec: JobSpec, job_id: str | None = None) -> str:
        """Record a new job in the `listing` state and return its id."""
        job_id = job_id or new_job_id()
        with _translated(f"create job {job_id}"):
            self._redis.hset(
                _key(job_id),
                mapping={
                    "container": spec.container, "prefix": spec.prefix, "service": spec.service,
                    "results_container": spec.results_container, "results_prefix": spec.results_prefix,
                    "listed": 0, "listing_done": 0, "created_at": time.time(),
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

    def add_listed(self, job_id: str, blobs: list[str]) -> None:
        """Count blobs as listed (a set, so listing a page twice after a producer restart counts once)."""
        if not blobs:
            return
        with _translated(f"list into job {job_id}"):
            self._redis.sadd(_key(job_id, "listed"), *blobs)

    def finish_listing(self, job_id: str) -> None:
        """Mark the listing complete: from now on the job can become `done`."""
        with _translated(f"finish listing of job {job_id}"):
            self._redis.hset(_key(job_id), "listing_done", 1)

    def record_outcome(self, job_id: str, blob: str, outcome: Outcome) -> None:
        """Count the image's final outcome once, whatever how often it is recorded."""
        other: Outcome = "rejected" if outcome == "ok" else "ok"
        with _translated(f"record outcome in job {job_id}"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.sadd(_key(job_id, outcome), blob)
            pipe.srem(_key(job_id, other), blob)
            pipe.srem(_key(job_id, "retrying"), blob)
            pipe.execute()

    def record_retry(self, job_id: str, blob: str) -> None:
        """Mark the image as waiting on a retry."""
        with _translated(f"record retry in job {job_id}"):
            self._redis.sadd(_key(job_id, "retrying"), blob)

    def status(self, job_id: str) -> JobStatus:
        """The job's counts and state."""
        record = self._record(job_id)
        with _translated(f"status of job {job_id}"):
            pipe = self._redis.pipeline(transaction=False)
            for part in ("listed", "ok", "rejected", "retrying"):
                pipe.scard(_key(job_id, part))
            listed, ok, rejected, retrying = (int(n) for n in pipe.execute())
        finished = ok + rejected
        state: JobState = "running"
        if record.get("listing_done") != "1":
            state = "listing"
        elif finished >= listed:
            state = "done"
        return JobStatus(job_id, listed, ok, rejected, retrying, max(listed - finished, 0), state)

    def members(self, job_id: str, part: Literal["listed", "ok", "rejected", "retrying"]) -> Iterator[str]:
        """The blob names in one of the job's sets."""
        with _translated(f"read job {job_id}"):
            yield from self._redis.sscan_iter(_key(job_id, part), count=1000)

    def _record(self, job_id: str) -> dict[str, str]:
        with _translated(f"read job {job_id}"):
            record: dict[str, str] = self._redis.hgetall(_key(job_id))  # type: ignore[assignment]
        if not record:
            raise UnknownJobError(f"no job {job_id!r}")
        return record


def _key(job_id: str, part: str | None = None) -> str:
    return f"{KEY_PREFIX}{job_id}" if part is None else f"{KEY_PREFIX}{job_id}:{part}"
