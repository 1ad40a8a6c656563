"""Fixtures of the fault suite: its own redis-server, its own Azurite (access log on: it counts result writes),
a job per test, process cleanup, and the tally table printed at the end of the session.

A missing service fails the test; it is never a reason to skip (these tests are integration tests too).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from fault_helpers import AzuriteService, FaultJob, Processes, fault_env, new_service_name, start_logged_azurite

from deploy.local.azurite import connection_string
from deploy.local.procs import free_port
from deploy.local.redis_local import RedisUnavailableError, start_redis

# Tallies of this session's scenarios, printed as a table at the end and written to a JSON file.
_TALLIES: list[dict[str, Any]] = []
_REPORT_FILE: list[Path] = []
REPORT_ENV = "BLOBSCORE_FAULTS_REPORT"


MakeJob = Callable[..., FaultJob]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/faults is a fault test, and an integration test (so it may never be skipped)."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def faults_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of the fault suite's own on a free port: another test session (the integration tests flush
    database 9 of the machine's Redis; a second run of this suite) can never empty it under a running scenario."""
    port = free_port()
    try:
        server = start_redis(port, tmp_path_factory.mktemp("redis"))
    except RedisUnavailableError as exc:
        pytest.fail(f"the fault suite needs redis-server: {exc}", pytrace=False)
    yield f"redis://127.0.0.1:{port}/0"
    server.kill()


@pytest.fixture(scope="session")
def faults_azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteService]:
    """An in-memory Azurite of the fault suite's own, on a free port, logging every request."""
    port = free_port()
    log = tmp_path_factory.mktemp("azurite") / "azurite.log"
    process = start_logged_azurite(port, log)
    yield AzuriteService(port, connection_string(port), log, process)
    process.stop()


@pytest.fixture(scope="session")
def faults_blob_service(faults_azurite: AzuriteService) -> Iterator[BlobServiceClient]:
    """A Blob client on the suite's Azurite."""
    with BlobServiceClient.from_connection_string(faults_azurite.connection_string) as client:
        yield client


@pytest.fixture
def procs() -> Iterator[Processes]:
    """Processes started by the test; all stopped at teardown."""
    processes = Processes()
    yield processes
    processes.stop_all()


@pytest.fixture
def make_job(
    request: pytest.FixtureRequest, tmp_path: Path, faults_redis_url: str, faults_azurite: AzuriteService,
    faults_blob_service: BlobServiceClient,
) -> Iterator[MakeJob]:
    """`make_job(broker_url=None, azurite=None, extra=None, ...)`: a new container and the environment of a job
    on it (start its stand-in with `job.start_standin`); the scenario name is the test's."""
    made: list[tuple[BlobServiceClient, str]] = []

    def make(
        *, broker_url: str | None = None, azurite: AzuriteService | None = None,
        blob_service: BlobServiceClient | None = None, extra: dict[str, str] | None = None,
        service: str | None = None, blob_connection_string: str | None = None,
    ) -> FaultJob:
        azurite = azurite or faults_azurite
        client = blob_service or faults_blob_service
        service = service or new_service_name()
        container = f"faults-{uuid.uuid4().hex[:16]}"
        client.create_container(container)
        if client is faults_blob_service:  # a scenario's private Azurite dies with its data at teardown
            made.append((client, container))
        env = fault_env(
            broker_url=broker_url or faults_redis_url,
            blob_connection_string=blob_connection_string or azurite.connection_string,
            scoring_port=0, service=service, extra=extra,
        )
        return FaultJob(
            scenario=request.node.name, workdir=tmp_path, env=env, blob_service=client, container=container,
            service=service, azurite_log=azurite.log, stats_files=[],
        )

    yield make
    for client, container in made:
        client.delete_container(container)


@pytest.fixture
def fault_report(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[dict[str, Any]], None]:
    """Record a scenario's tally: printed now (with -s), in the table at the end of the session, and in a JSON
    file ($BLOBSCORE_FAULTS_REPORT, else faults-report.json in pytest's temporary root)."""
    if not _REPORT_FILE:
        target = os.environ.get(REPORT_ENV)
        _REPORT_FILE.append(Path(target) if target else tmp_path_factory.getbasetemp() / "faults-report.json")

    def record(tally: dict[str, Any]) -> None:
        entry = {"test": request.node.nodeid, **tally}
        _TALLIES.append(entry)
        print(f"\nFAULT TALLY {json.dumps(entry, ensure_ascii=False)}")
        _REPORT_FILE[0].write_text(json.dumps(_TALLIES, indent=2, ensure_ascii=False))

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault suite's tally table: nothing lost, nothing doubled, and how long each recovery took."""
    if not _TALLIES:
        return
    terminalreporter.write_sep("=", "fault suite tallies")
    width = min(110, max(len(entry["scenario"]) for entry in _TALLIES))
    terminalreporter.write_line(
        f"{'scenario':<{width}} {'listed':>6} {'results':>7} {'rej':>4} {'lost':>4} {'dbl':>4} "
        f"{'calls/img':>9} {'max':>4} {'recovery_s':>10}"
    )
    for entry in _TALLIES:
        recovery = entry.get("recovery_s")
        terminalreporter.write_line(
            f"{entry['scenario'][:width]:<{width}} {entry['listed']:>6} {entry['results']:>7} "
            f"{entry['rejected']:>4} {entry['lost']:>4} {entry['doubled']:>4} {entry['scorer_calls_per_image']:>9} "
            f"{entry['scorer_calls_max']:>4} {'' if recovery is None else f'{recovery:.1f}':>10}"
        )
    if _REPORT_FILE:
        terminalreporter.write_line(f"(details: {_REPORT_FILE[0]})")
