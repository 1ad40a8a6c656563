"""kombu's Redis channel reuses one client for its bookkeeping instead of building a new one for every command.

kombu's Redis transport calls `Channel._create_client()` for every delivery record, every acknowledgement, every
restore and every publish, and each call builds a new `redis.Redis` — about 0.2 ms of CPU, most of it filling the
client's table of response callbacks. That is two per image in a worker (its delivery record and its ack) and one
or two per task the producer queues (bench/README.md, "What a kombu client costs"). A `redis.Redis` is safe to
share between threads (every command takes a connection from the pool; a pipeline is its own object), so each
channel keeps one per connection pool and builds a new one only when kombu replaces the pool (after a connection
error). The blocking consumer's client (`asynchronous=True`) is kombu's own, untouched: it pins a connection.
"""

from __future__ import annotations

import functools
from typing import Any

from kombu.transport import redis as kombu_redis

_PATCHED = "_blobscore_reuses_clients"
_CACHED = "_blobscore_client"
_reusing = [True]


def reuse_clients(reuse: bool = True) -> None:
    """Patch kombu's Redis channel once per process (idempotent); `reuse=False` restores kombu's way (benchmarks)."""
    _reusing[0] = reuse
    channel: Any = kombu_redis.Channel
    if getattr(channel, _PATCHED, False):
        return
    original = channel._create_client

    @functools.wraps(original)
    def create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous or not _reusing[0]:
            return original(self, asynchronous=asynchronous)
        pool = self.pool  # kombu's pool of the moment: a new one after _disconnect_pools
        cached = self.__dict__.get(_CACHED)
        if cached is not None and cached.connection_pool is pool:
            return cached
        client = original(self)
        self.__dict__[_CACHED] = client
        return client

    channel._create_client = create_client
    setattr(channel, _PATCHED, True)
