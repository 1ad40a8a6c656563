"""A circuit breaker per scoring service, shared by every worker through Redis, so they back off together."""

from __future__ import annotations

import threading
import time

import redis

from worker import metrics
from worker.errors import CircuitOpenError

# Failures are counted in a sliding-ish window: the counter expires this long after the first failure.
FAILURE_WINDOW_S = 10
# The local copy of the shared state is refreshed at most this often: one Redis read per process, not per image.
LOCAL_CACHE_S = 0.5


class CircuitBreaker:
    """Opens after `threshold` outage-like failures within a window; stays open `open_s`; then lets calls probe."""

    def __init__(self, client: redis.Redis, service: str, *, key_prefix: str, threshold: int, open_s: float) -> None:
        self._redis = client
        self._service = service
        self._prefix = f"{key_prefix}breaker:{service}:"
        self._threshold = threshold
        self._open_s = open_s
        self._lock = threading.Lock()
        self._open_until = 0.0
        self._reason: str | None = None
        self._checked_at = 0.0
        self._failures_seen = False
        # blobscore_breaker_open{service}: read at scrape time from this process's copy of the shared state.
        metrics.BREAKER_OPEN.labels(service).set_function(self.is_open_here)

    def is_open_here(self) -> float:
        """1.0 while this process holds calls off the service (its copy of the shared state, at most 0.5 s old)."""
        return 1.0 if self._open_until > time.time() else 0.0

    def check(self) -> None:
        """Raise CircuitOpenError while the breaker is open (state cached briefly per process)."""
        now = time.time()
        if now - self._checked_at > LOCAL_CACHE_S:
            with self._lock:
                try:
                    value, reason = self._redis.mget([self._key("open_until"), self._key("reason")])
                except redis.RedisError:
                    value = reason = None  # Without Redis the breaker fails open: the scorer's own errors still count.
                self._open_until = float(value) if value else 0.0
                self._reason = str(reason) if reason else None
                self._checked_at = now
        if self._open_until > now:
            raise CircuitOpenError(self._service, self._open_until - now, self._reason)

    def open_for(self, reason: str) -> None:
        """Open at once for everyone, with the reason shown to whoever waits (a refused key: no call can succeed)."""
        until = time.time() + self._open_s
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.set(self._key("open_until"), until, ex=int(self._open_s) + 1)
            pipe.set(self._key("reason"), reason, ex=int(self._open_s) + 1)
            pipe.execute()
        except redis.RedisError:
            pass  # the local state below still holds this process's threads off the service
        with self._lock:
            self._open_until, self._reason, self._checked_at = until, reason, time.time()

    def record_failure(self) -> None:
        """Count one outage-like failure; open the breaker for everyone once the threshold is reached."""
        self._failures_seen = True
        key = self._key("failures")
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, FAILURE_WINDOW_S, nx=True)
            count = int(pipe.execute()[0])
            if count >= self._threshold:
                until = time.time() + self._open_s
                self._redis.set(self._key("open_until"), until, ex=int(self._open_s) + 1)
                self._redis.delete(key)
                with self._lock:
                    self._open_until, self._checked_at = until, time.time()
        except redis.RedisError:
            return

    def record_success(self) -> None:
        """Reset the failure count after a success (a Redis write only when this process saw failures)."""
        if not self._failures_seen:
            return
        self._failures_seen = False
        try:
            self._redis.delete(self._key("failures"))
        except redis.RedisError:
            return

    def _key(self, part: str) -> str:
        return f"{self._prefix}{part}"
