"""kombu on a real Redis with client reuse on: one bookkeeping client per channel and pool, a new one after a reset."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

from worker.kombu_clients import reuse_clients

pytestmark = pytest.mark.integration


@pytest.fixture
def reusing() -> Iterator[None]:
    reuse_clients()
    yield
    reuse_clients()  # what every worker and producer process runs


def test_a_channel_reuses_one_client_until_kombu_replaces_its_pool(redis_url: str, reusing: None) -> None:
    with Connection(redis_url) as connection:
        channel: Any = connection.default_channel
        first = channel._create_client()
        assert channel._create_client() is first, "the delivery record and the ack share one client"
        with channel.conn_or_acquire() as client:
            assert client is first
            client.set("kombu-clients-test", "1")  # and it works
        assert channel._create_client(asynchronous=True) is not first, "the blocking consumer's client is its own"
        channel._disconnect_pools()  # what kombu does after a connection error
        second = channel._create_client()
        assert second is not first
        assert second.connection_pool is channel.pool
        assert second.get("kombu-clients-test") == b"1"
        second.delete("kombu-clients-test")
        other = connection.channel()
        assert other._create_client() is not second, "one per channel"


def test_turned_off_every_call_builds_a_client_as_kombu_does(redis_url: str, reusing: None) -> None:
    reuse_clients(reuse=False)
    with Connection(redis_url) as connection:
        channel: Any = connection.default_channel
        assert channel._create_client() is not channel._create_client()
