"""Why a job does not move, in lines a person can act on: the errors holding images back, a queue nobody consumes."""

from __future__ import annotations

import time

import redis

from worker.jobs import JobError, JobStatus, JobStore
from worker.presence import QueuePresence, describe_stall, queue_presence


def error_lines(status: JobStatus, errors: list[JobError]) -> list[str]:
    """One line per kind of error while images still wait (pure): what, which service, since when, how often."""
    waiting = status.retrying or status.pending
    if status.state == "done" or not waiting:
        return []
    return [
        f"{waiting} images waiting: {error.message} (since {_clock(error.first_seen)}, last {_clock(error.last_seen)},"
        f" {error.count}×)"
        for error in errors
    ]


def problems(
    status: JobStatus, errors: list[JobError], presence: QueuePresence, listing: QueuePresence | None = None
) -> list[str]:
    """Every line worth showing for a job that is not done (pure)."""
    if status.state == "done":
        return []
    lines = []
    if status.state == "listing" and listing is not None and not listing.consumed:
        lines.append(f"nothing is carrying the listing of this job (queue {listing.queue}): start a worker "
                     "(`blobscore worker`) or `blobscore beat`")
    stall = describe_stall(presence, status.pending)
    return [*lines, *([stall] if stall else []), *error_lines(status, errors)]


def diagnose(
    jobs: JobStore, client: redis.Redis, key_prefix: str, queue: str, listing_queue: str, status: JobStatus
) -> list[str]:
    """Read the job's errors and its queues' presence, then say what holds it back (nothing when done)."""
    if status.state == "done":
        return []
    return problems(status, jobs.errors(status.job_id), queue_presence(client, key_prefix, queue),
                    queue_presence(client, key_prefix, listing_queue))


def _clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))
