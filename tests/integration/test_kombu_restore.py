"""kombu on a real Redis: a message it fails to restore stays unacknowledged instead of vanishing."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis
from kombu import Connection

from worker.kombu_restore import RestoreFailedError, keep_unrestorable_messages

pytestmark = pytest.mark.integration


def test_a_failed_restore_keeps_the_message_and_a_good_one_requeues_it(redis_url: str) -> None:
    keep_unrestorable_messages()
    queue = f"restore-{uuid.uuid4().hex[:8]}"
    tag = f"tag-{uuid.uuid4().hex}"
    client = redis.Redis.from_url(redis_url)
    with Connection(redis_url) as connection:
        channel: Any = connection.default_channel
        channel.exchange_declare(queue, type="direct")
        channel.queue_declare(queue)
        channel.queue_bind(queue, exchange=queue, routing_key=queue)
        payload = {"body": "x", "headers": {}, "properties": {"delivery_info": {}}}
        client.hset("unacked", tag, json.dumps([payload, queue, queue]))
        client.zadd("unacked_index", {tag: 1.0})

        def broken_lookup(*_: Any, **__: Any) -> list[str]:
            raise AttributeError("'NoneType' object has no attribute 'hostname'")  # kombu's state mid-restart

        channel._lookup = broken_lookup
        assert channel.qos.restore_by_tag(tag) is False
        assert client.hexists("unacked", tag), "an unrestorable message must stay unacknowledged, not vanish"
        assert client.llen(queue) == 0
        del channel._lookup  # the channel's own lookup again
        assert channel.qos.restore_by_tag(tag) is True
        assert not client.hexists("unacked", tag)
        assert client.llen(queue) == 1
    client.delete(queue)
    client.close()


def test_a_restore_on_a_torn_down_connection_keeps_the_messages_and_raises_nothing(redis_url: str) -> None:
    keep_unrestorable_messages()
    queue = f"torn-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    with Connection(redis_url) as connection:
        channel: Any = connection.default_channel
        channel.queue_declare(queue)
        channel.basic_publish(channel.prepare_message("x"), exchange="", routing_key=queue)
        message = channel.basic_get(queue, no_ack=False)
        assert message is not None
        assert client.hexists("unacked", message.delivery_tag)
        # What a Redis restart leaves behind while kombu handles the consumer's connection error: the pools dropped,
        # the transport detached from its Connection (kombu's Connection._do_close_transport).
        channel._disconnect_pools()
        transport = channel.connection
        transport.client = None
        channel.qos.restore_unacked_once()  # stock kombu: AttributeError, and Celery stops the worker
        assert client.hexists("unacked", message.delivery_tag), "the message stays for the lease or the timeout"
        assert client.llen(queue) == 0
        transport.client = connection
    client.hdel("unacked", message.delivery_tag)
    client.zrem("unacked_index", message.delivery_tag)
    client.delete(queue)
    client.close()


def test_the_visibility_sweep_goes_on_past_a_message_it_cannot_restore(redis_url: str) -> None:
    keep_unrestorable_messages()
    ours, gone = f"sweep-{uuid.uuid4().hex[:8]}", f"gone-{uuid.uuid4().hex[:8]}"
    older, newer = f"tag-{uuid.uuid4().hex}", f"tag-{uuid.uuid4().hex}"
    client = redis.Redis.from_url(redis_url)
    payload = {"body": "x", "headers": {}, "properties": {"delivery_info": {}}}
    # Both expired long ago; the sweep takes the newest first, and the newest cannot be restored.
    client.hset("unacked", mapping={older: json.dumps([payload, "", ours]), newer: json.dumps([payload, gone, gone])})
    client.zadd("unacked_index", {older: 1.0, newer: 2.0})
    with Connection(redis_url, transport_options={"visibility_timeout": 60}) as connection:
        channel: Any = connection.default_channel
        channel.queue_declare(ours)
        lookup = channel._lookup

        def lookup_failing_for_gone(exchange: str, routing_key: str, *args: Any) -> Any:
            if exchange == gone:
                raise RestoreFailedError(f"no queue for {gone}")  # what the patched restore raises for it
            return lookup(exchange, routing_key, *args)

        channel._lookup = lookup_failing_for_gone
        channel.qos.restore_visible(num=10, interval=1)
    assert client.llen(ours) == 1, "the message behind the unrestorable one was restored"
    assert not client.hexists("unacked", older)
    assert client.hexists("unacked", newer), "the unrestorable one stays unacknowledged"
    client.hdel("unacked", newer)
    client.zrem("unacked_index", newer)
    client.delete(ours)
    client.close()
