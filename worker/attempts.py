"""Poison-pill accounting: how often an image's task started without finishing (a crash or a hang)."""

from __future__ import annotations

import redis

from worker.errors import TransientError

# Long enough to outlive every redelivery of a job's image, short enough to clean itself up.
ATTEMPTS_TTL_S = 7 * 24 * 3600


class AttemptCounter:
    """Counts unfinished starts per image: a task that kills its worker never reaches `finished`."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self._redis = client
        self._prefix = f"{key_prefix}attempts:"

    def started(self, job_id: str, blob: str) -> int:
        """Count a start and return how many starts have not finished so far (this one included)."""
        key = self._key(job_id, blob)
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, ATTEMPTS_TTL_S)
            return int(pipe.execute()[0])
        except redis.RedisError as exc:
            raise TransientError(f"attempt counter unreachable: {exc}") from exc

    def finished(self, job_id: str, blob: str) -> None:
        """The task ended normally (result, rejection or scheduled retry): it is not a poison pill."""
        try:
            self._redis.delete(self._key(job_id, blob))
        except redis.RedisError:
            return  # At worst the image gets one fewer crash allowance later.

    def _key(self, job_id: str, blob: str) -> str:
        return f"{self._prefix}{job_id}:{blob}"
