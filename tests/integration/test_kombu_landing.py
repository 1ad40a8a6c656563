"""kombu on a real Redis with landing on: a message taken off its queue is in Redis at every moment.

A consumer process killed between the pop and kombu's `unacked` record (the gap stock kombu leaves) must leave the
message in the landing hash, from where it goes back to its queue exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from worker import kombu_landing, landing_sweep
from worker.leases import ORPHAN_AGE_S, landing_key, lease_key, reclaim_orphans

pytestmark = pytest.mark.integration


@pytest.fixture
def landing(redis_url: str) -> Iterator[kombu_landing.Landing]:
    prefix = f"landing-test:{uuid.uuid4().hex[:8]}:"
    yield kombu_landing.land_messages(landing_key(prefix), f"worker-{uuid.uuid4().hex[:6]}")
    kombu_landing.stop_landing()


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def _publish(connection: Connection, queue: Queue, *bodies: str) -> None:
    producer = Producer(connection.channel())
    for body in bodies:
        producer.publish({"body": body}, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                         serializer="json")


def _receive_one(connection: Connection, queue: Queue, received: list[Any], within_s: float) -> None:
    """Consume until a message arrives (or the time is up), riding out empty waits and kombu's decode errors."""
    with Consumer(connection.channel(), [queue], callbacks=[lambda body, message: received.append(message)]):
        deadline = time.monotonic() + within_s
        while not received and time.monotonic() < deadline:
            try:
                connection.drain_events(timeout=1)
            except (TimeoutError, ValueError):
                continue


def test_a_consumed_message_is_recorded_unacked_and_its_landing_cleared(
    redis_url: str, broker: redis.Redis, landing: kombu_landing.Landing
) -> None:
    queue = _queue(f"land-{uuid.uuid4().hex[:8]}")
    received: list[Any] = []
    with Connection(redis_url) as connection:
        _publish(connection, queue, "a", "b", "c")
        with Consumer(connection.channel(), [queue], callbacks=[lambda body, message: received.append(message)]):
            while len(received) < 3:
                connection.drain_events(timeout=5)
        tags = [message.delivery_tag for message in received]
        assert sorted(message.payload["body"] for message in received) == ["a", "b", "c"]
        assert all(broker.hexists("unacked", tag) for tag in tags), "kombu recorded each message as unacked"
        assert broker.hlen(landing.key) == 0, "each landing field went in the same transaction"
        assert not landing.under_way()
        assert broker.llen(queue.name) == 0
        for message in received:
            message.ack()
        assert not any(broker.hexists("unacked", tag) for tag in tags)


def test_an_idle_consumer_wakes_for_a_message_published_later_and_takes_it_once(
    redis_url: str, broker: redis.Redis, landing: kombu_landing.Landing
) -> None:
    queue = _queue(f"idle-{uuid.uuid4().hex[:8]}")
    received: list[Any] = []
    with Connection(redis_url) as connection:
        connection.channel().queue_declare(queue.name)
        later = threading.Timer(1.5, lambda: _publish(Connection(redis_url), queue, "late"))
        later.start()
        _receive_one(connection, queue, received, within_s=15)
        later.join()
        assert [message.payload["body"] for message in received] == ["late"]
        # The idle wait moved nothing: the message was taken once, by the pop, and nothing is left behind.
        assert broker.llen(queue.name) == 0
        assert broker.hlen(landing.key) == 0
        received[0].ack()


CONSUMER_KILLED_IN_THE_GAP = textwrap.dedent("""
    import os, signal, sys
    from kombu import Connection, Consumer, Exchange, Queue
    from worker import kombu_landing

    url, key, owner, name = sys.argv[1:5]
    kombu_landing.land_messages(key, owner)
    # Die exactly where stock kombu holds the message only in memory: popped, not yet recorded as unacked.
    kombu_landing._deliver = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with Connection(url) as connection:
        with Consumer(connection.channel(), [queue], callbacks=[lambda body, message: None]):
            connection.drain_events(timeout=10)
    sys.exit("the consumer was not killed")
""")


def test_a_consumer_killed_between_the_pop_and_the_unacked_record_loses_nothing(
    redis_url: str, broker: redis.Redis, landing: kombu_landing.Landing
) -> None:
    queue = _queue(f"gap-{uuid.uuid4().hex[:8]}")
    with Connection(redis_url) as connection:
        _publish(connection, queue, "only copy")
    before = broker.lrange(queue.name, 0, -1)
    dead = f"dead-{uuid.uuid4().hex[:6]}"
    run = subprocess.run([sys.executable, "-c", CONSUMER_KILLED_IN_THE_GAP, redis_url, landing.key, dead, queue.name],
                         capture_output=True, text=True, timeout=60, check=False, env=os.environ.copy())
    assert run.returncode == -9, run.stderr
    assert broker.llen(queue.name) == 0, "the consumer took the message"
    left = landing_sweep.entries(broker, landing.key)
    assert [(entry.owner, entry.queue_key) for entry in left] == [(dead, queue.name)], "the message is landed"

    # The dead worker has no lease: the sweep puts the message back, once, as it was.
    assert landing_sweep.put_back_dead(broker, landing.key, lambda owners: set(), min_age_s=0) == 1
    assert landing_sweep.put_back_dead(broker, landing.key, lambda owners: set(), min_age_s=0) == 0
    assert broker.lrange(queue.name, 0, -1) == before
    assert broker.hlen(landing.key) == 0


def test_the_lease_sweep_puts_back_only_what_dead_workers_left_landed(
    redis_url: str, broker: redis.Redis, landing: kombu_landing.Landing
) -> None:
    prefix = landing.key.removesuffix("landing")
    queue = f"sweep-{uuid.uuid4().hex[:8]}"
    old = time.time() - ORPHAN_AGE_S - 1
    alive, dead = "alive-worker", "dead-worker"
    broker.set(lease_key(prefix, alive), "now", ex=30)
    broker.hset(landing.key, mapping={
        f"{alive}|1": f"{old:.0f}\n{queue}\nheld by a live worker",
        f"{dead}|1": f"{old:.0f}\n{queue}\nleft by a dead worker",
        f"{dead}|2": f"{time.time():.0f}\n{queue}\njust landed: its worker may be starting",
    })
    restored = reclaim_orphans(None, broker, broker, prefix, "sweep", "sweeper")
    assert restored == 1
    assert broker.lrange(queue, 0, -1) == ["left by a dead worker"]
    assert sorted(broker.hkeys(landing.key)) == [f"{alive}|1", f"{dead}|2"]


def test_a_worker_puts_back_its_own_landed_messages_whose_delivery_is_over(
    broker: redis.Redis, landing: kombu_landing.Landing
) -> None:
    queue = f"stale-{uuid.uuid4().hex[:8]}"
    under_way = landing.begin()
    over = landing.begin()
    landing.end(over)  # its connection dropped before the reply was read
    now = f"{time.time():.0f}"
    broker.hset(landing.key, mapping={
        under_way: f"{now}\n{queue}\nbeing delivered",
        over: f"{now}\n{queue}\nlost with its connection",
        "another-worker|1": f"{now}\n{queue}\nnot ours",
    })
    assert landing_sweep.put_back_stale(broker, landing) == 1
    assert broker.lrange(queue, 0, -1) == ["lost with its connection"]
    assert sorted(broker.hkeys(landing.key)) == sorted([under_way, "another-worker|1"])


def test_a_message_kombu_cannot_take_is_set_aside_not_looped_or_lost(
    redis_url: str, broker: redis.Redis, landing: kombu_landing.Landing
) -> None:
    queue = _queue(f"junk-{uuid.uuid4().hex[:8]}")
    received: list[Any] = []
    with Connection(redis_url) as connection:
        connection.channel().queue_declare(queue.name)
        broker.lpush(queue.name, "not a kombu message {")
        _publish(connection, queue, "good")
        _receive_one(connection, queue, received, within_s=10)  # the junk surfaces as kombu's decode error, once
        assert [message.payload["body"] for message in received] == ["good"]
        received[0].ack()
    assert broker.lrange(f"{landing.key}:undeliverable", 0, -1)[0].endswith("not a kombu message {")
    assert broker.llen(queue.name) == 0
    assert broker.hlen(landing.key) == 0


def test_a_pop_whose_reply_died_with_its_connection_is_put_back_by_the_heartbeat(
    redis_url: str, broker: redis.Redis, landing: kombu_landing.Landing
) -> None:
    queue = _queue(f"cut-{uuid.uuid4().hex[:8]}")
    with Connection(redis_url) as connection:
        _publish(connection, queue, "cut off")
        before = broker.lrange(queue.name, 0, -1)
        channel: Any = connection.channel()
        with Consumer(channel, [queue], callbacks=[lambda body, message: None]):
            client = channel.client
            client.connection = client.connection_pool.get_connection()
            channel._brpop_start()  # the pop runs on the server; its reply is never read
            deadline = time.monotonic() + 5
            while broker.hlen(landing.key) == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert broker.llen(queue.name) == 0
            assert landing.under_way(), "a pop whose reply is unread is under way"
            assert landing_sweep.put_back_stale(broker, landing) == 0, "never put back while under way"
            client.connection.disconnect()  # what a Redis restart does to the consumer's connection
            assert not landing.under_way(), "its reply died with the connection: the delivery is over"
    assert landing_sweep.put_back_stale(broker, landing) == 1
    assert broker.lrange(queue.name, 0, -1) == before
    assert broker.hlen(landing.key) == 0
