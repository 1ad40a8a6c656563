"""Putting landed messages back on their queues: this worker's deliveries that ended without being recorded, and
what dead workers had popped (worker/kombu_landing.py explains the landing hash).

Every move is a compare-and-set on the entry as read (WATCH): a message is put back exactly once, however many
processes sweep, and never while its delivery is still under way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from worker.kombu_landing import FIELD_SEP, Landing, as_text


@dataclass(frozen=True)
class Landed:
    """One message left in the landing hash: whose delivery, since when, from which queue."""

    field: str
    value: str
    owner: str
    landed_at: float
    queue_key: str


def parse(field: str, value: str | bytes) -> Landed | None:
    """A landing entry, or None when it is not one of ours (never touched)."""
    text = as_text(value)
    parts = text.split("\n", 2)
    owner = field.rsplit(FIELD_SEP, 1)[0]
    if len(parts) != 3 or FIELD_SEP not in field:
        return None
    try:
        landed_at = float(parts[0])
    except ValueError:
        return None
    return Landed(field=field, value=text, owner=owner, landed_at=landed_at, queue_key=parts[1])


def entries(broker: redis.Redis, key: str) -> list[Landed]:
    """Every entry of a landing hash."""
    found = (parse(as_text(field), value) for field, value in broker.hgetall(key).items())
    return [entry for entry in found if entry is not None]


def put_back(broker: redis.Redis, key: str, entry: Landed) -> bool:
    """Push a landed message back on its queue (the end BRPOP takes from) if the entry is still as read: exactly
    once, whoever else tries."""
    def move(pipe: Any) -> bool:
        if as_text(pipe.hget(key, entry.field) or b"") != entry.value:
            return False
        pipe.multi()
        pipe.rpush(entry.queue_key, entry.value.split("\n", 2)[2])
        pipe.hdel(key, entry.field)
        return True

    transaction: Any = broker.transaction  # redis-py types the callable as returning None
    return bool(transaction(move, key, value_from_callable=True))


def put_back_stale(broker: redis.Redis, landing: Landing) -> int:
    """This process's entries whose delivery is over yet still landed (a connection lost mid-delivery): back on
    their queues. Read before the deliveries under way, so a field seen here and not under way is truly over."""
    mine = [entry for entry in entries(broker, landing.key) if entry.owner == landing.owner]
    if not mine:
        return 0
    under_way = landing.under_way()
    return sum(put_back(broker, landing.key, entry) for entry in mine if entry.field not in under_way)


def put_back_dead(broker: redis.Redis, key: str, alive: Callable[[Iterable[str]], set[str]], min_age_s: float) -> int:
    """Entries of workers with no live lease, landed at least `min_age_s` ago: back on their queues."""
    found = entries(broker, key)
    if not found:
        return 0
    now = time.time()
    living = alive({entry.owner for entry in found})
    return sum(put_back(broker, key, entry) for entry in found
               if entry.owner not in living and now - entry.landed_at >= min_age_s)
