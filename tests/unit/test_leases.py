"""The lease heartbeat's bookkeeping, against a small in-memory stand-in for the few Redis commands it sends.

The fault suite (tests/faults/test_faults_reclaim.py) runs the leases against real workers and a real Redis; these pin
what one heartbeat asks Redis and what it publishes as held.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from worker import leases
from worker.leases import UNACKED_KEY, Lease, held_key, workers_key

PREFIX = "bs:"


class FakeRedis:
    """Hashes, sets and strings in dicts; a pipeline runs its commands at execute(). Counts HEXISTS."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, str]] = {}
        self.sets: dict[str, set[str]] = {}
        self.strings: dict[str, str] = {}
        self.hexists_calls = 0

    def hexists(self, key: str, field: str) -> bool:
        self.hexists_calls += 1
        return field in self.hashes.get(key, {})

    def sismember(self, key: str, member: str) -> bool:
        return member in self.sets.get(key, set())

    def sadd(self, key: str, *members: str) -> int:
        self.sets.setdefault(key, set()).update(members)
        return len(members)

    def delete(self, *keys: str) -> int:
        for key in keys:
            self.sets.pop(key, None)
            self.strings.pop(key, None)
        return len(keys)

    def set(self, key: str, value: object, ex: int | None = None) -> bool:
        self.strings[key] = str(value)
        return True

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)


class FakePipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self._redis = redis
        self._calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def queue(*args: Any, **kwargs: Any) -> FakePipeline:
            self._calls.append((name, args, kwargs))
            return self

        return queue

    def execute(self) -> list[Any]:
        return [getattr(self._redis, name)(*args, **kwargs) for name, args, kwargs in self._calls]


def unacked(redis: FakeRedis, *tags: str) -> None:
    redis.hashes.setdefault(UNACKED_KEY, {}).update({tag: "message" for tag in tags})


def acked(redis: FakeRedis, *tags: str) -> None:
    for tag in tags:
        redis.hashes[UNACKED_KEY].pop(tag, None)


def published(redis: FakeRedis, lease: Lease) -> set[str]:
    return redis.sets.get(held_key(PREFIX, lease.worker_id), set())


@pytest.fixture
def redis() -> FakeRedis:
    return FakeRedis()


@pytest.fixture
def lease(redis: FakeRedis) -> Lease:
    """A registered lease holding two running tasks (a, b) and two finished ones (c acknowledged, d not yet)."""
    lease = Lease(PREFIX, worker_id="w1")
    lease.beat(redis, redis)  # registers
    for tag in "abcd":
        lease.received(tag, f"task-{tag}")
        unacked(redis, tag)
    lease.finished("task-c")
    lease.finished("task-d")
    acked(redis, "c")
    return lease


def test_a_heartbeat_asks_only_about_finished_tasks(redis: FakeRedis, lease: Lease) -> None:
    redis.hexists_calls = 0
    lease.beat(redis, redis)
    assert redis.hexists_calls == 2  # c and d: a running task's message is unacknowledged by definition
    assert published(redis, lease) == {"a", "b", "d"}
    assert redis.sismember(workers_key(PREFIX), "w1")


def test_every_tag_is_asked_about_at_least_every_full_check(
    redis: FakeRedis, lease: Lease, monkeypatch: pytest.MonkeyPatch
) -> None:
    acked(redis, "a")  # requeued by someone else while its task still runs
    lease.beat(redis, redis)
    assert "a" in published(redis, lease)
    now = leases.time.monotonic()
    monkeypatch.setattr(leases.time, "monotonic", lambda: now + leases.FULL_CHECK_S + 0.1)
    redis.hexists_calls = 0
    lease.beat(redis, redis)
    assert redis.hexists_calls == 3  # a, b and d
    assert published(redis, lease) == {"b", "d"}


def test_a_lease_taken_over_asks_about_every_tag_at_once(
    redis: FakeRedis, lease: Lease, caplog: pytest.LogCaptureFixture
) -> None:
    lease.beat(redis, redis)
    redis.sets[workers_key(PREFIX)].discard("w1")  # another process reclaimed it while this one was paused
    acked(redis, "a", "b")  # and requeued what it held
    redis.hexists_calls = 0
    with caplog.at_level(logging.WARNING, logger="worker.leases"):
        lease.beat(redis, redis)
    assert redis.hexists_calls == 3
    assert published(redis, lease) == {"d"}
    assert "taken over" in caplog.text
    assert redis.sismember(workers_key(PREFIX), "w1")  # registered again


def test_an_acknowledged_finished_tag_is_forgotten(redis: FakeRedis, lease: Lease) -> None:
    lease.beat(redis, redis)
    acked(redis, "d")
    lease.beat(redis, redis)
    redis.hexists_calls = 0
    lease.beat(redis, redis)
    assert redis.hexists_calls == 0  # nothing finished is left to ask about
    assert published(redis, lease) == {"a", "b"}
