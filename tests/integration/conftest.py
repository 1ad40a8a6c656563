"""Fixtures on the real local services: Redis, an in-memory Azurite, stand-in scorers, fresh containers.

A missing service fails the test with a clear error; it is never a reason to skip.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from azure.core.exceptions import AzureError
from azure.storage.blob import BlobServiceClient

from deploy.local.azurite import PROJECT_ROOT, AzuriteUnavailableError, connection_string, start_azurite
from deploy.local.procs import ManagedProcess, ProcessExitedError, free_port
from deploy.local.redis_local import RedisUnavailableError, ensure_redis

# The machine's Redis, with a database of its own that each session starts empty.
REDIS_TEST_URL = "redis://127.0.0.1:6379/9"
# The stand-in builds its model on a cold start.
STANDIN_START_TIMEOUT_S = 120.0
LISTENING = re.compile(r"listening on (?P<host>\[[^\]]+\]|[^\s:]+):(?P<port>\d+)")


@dataclass(frozen=True)
class AzuriteHandle:
    """A running Azurite Blob service."""

    port: int
    connection_string: str
    process: ManagedProcess


@dataclass(frozen=True)
class StandinHandle:
    """A running stand-in scorer and where it listens."""

    host: str
    port: int
    process: ManagedProcess

    @property
    def address(self) -> str:
        """`host:port` as a gRPC target (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


StandinFactory = Callable[..., StandinHandle]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration is an integration test (and so may never be skipped)."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Redis on 127.0.0.1:6379 (started if none answers), database 9, emptied at session start."""
    try:
        started = ensure_redis(REDIS_TEST_URL, tmp_path_factory.mktemp("redis"))
    except RedisUnavailableError as exc:
        pytest.fail(f"integration tests need Redis on 127.0.0.1:6379: {exc}", pytrace=False)
    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        client.flushdb()
    finally:
        client.close()
    yield REDIS_TEST_URL
    if started is not None:
        started.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteHandle]:
    """A fresh in-memory Azurite on a free port, for the whole session."""
    port = free_port()
    log = tmp_path_factory.mktemp("azurite") / "azurite.log"
    try:
        process = start_azurite(port, log)
    except AzuriteUnavailableError as exc:
        pytest.fail(f"integration tests need Azurite (npm package from package.json): {exc}", pytrace=False)
    yield AzuriteHandle(port=port, connection_string=connection_string(port), process=process)
    process.stop()


@pytest.fixture(scope="session")
def blob_service(azurite: AzuriteHandle) -> Iterator[BlobServiceClient]:
    """A Blob service client on the session's Azurite."""
    client = BlobServiceClient.from_connection_string(azurite.connection_string)
    with client:
        yield client


@pytest.fixture
def tmp_container(blob_service: BlobServiceClient) -> Iterator[str]:
    """A new, uniquely named, empty container; deleted afterwards."""
    name = f"test-{uuid.uuid4().hex}"
    try:
        blob_service.create_container(name)
    except AzureError as exc:
        pytest.fail(f"could not create container {name} in Azurite: {exc}", pytrace=False)
    yield name
    blob_service.delete_container(name)


@pytest.fixture
def standin_factory(tmp_path: Path) -> Iterator[StandinFactory]:
    """Start stand-in scorers: `standin_factory(*args, env=None)`; each one is stopped after the test."""
    started: list[ManagedProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> StandinHandle:
        log = tmp_path / f"standin-{len(started)}.log"
        argv = [sys.executable, "-m", "deploy.standin", "--port", "0", *args]
        process = ManagedProcess.start(argv, log, env={**os.environ, **(env or {})}, cwd=PROJECT_ROOT)
        started.append(process)
        try:
            match = process.wait_for_log(LISTENING.pattern, STANDIN_START_TIMEOUT_S)
        except (ProcessExitedError, TimeoutError) as exc:
            pytest.fail(f"the stand-in scorer did not start ({' '.join(argv)}): {exc}", pytrace=False)
        return parse_listening(match.group(0), process)

    yield start
    for process in started:
        process.stop()


def parse_listening(line: str, process: ManagedProcess) -> StandinHandle:
    """The handle for a stand-in that logged `line` ("listening on HOST:PORT")."""
    match = LISTENING.search(line)
    if match is None:
        raise ValueError(f"not a 'listening on HOST:PORT' line: {line!r}")
    host = match["host"].strip("[]")
    # A server bound to every interface is reached on the loopback one.
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return StandinHandle(host=host, port=int(match["port"]), process=process)
