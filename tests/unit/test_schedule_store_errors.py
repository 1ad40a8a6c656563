"""The schedule store turns Redis failures into our errors: a store whose Redis is down raises TransientError."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from deploy.local.procs import free_port
from producer.scheduling.app import namespace, schedules_app
from producer.scheduling.spec import make_spec
from producer.scheduling.store import RunRecord, ScheduleStore
from worker.errors import TransientError
from worker.services import ServiceConfig
from worker.settings import Settings


@pytest.fixture
def dead_store() -> Iterator[ScheduleStore]:
    """A store (and its redbeat app) on a port nothing listens on: a real client, no mocks."""
    port = free_port()
    services = {"eastus": ServiceConfig(name="eastus", region="eastus", address="a.example")}
    settings = Settings(services=services, broker_url=f"redis://127.0.0.1:{port}/0", queue="bs", namespace="unit")
    # No retries: redis-py would otherwise try the dead port again with backoff, seconds per call.
    client = redis.Redis(port=port, socket_connect_timeout=0.2, decode_responses=True, retry=Retry(NoBackoff(), 0))
    store = ScheduleStore(schedules_app(settings), client, namespace(settings))
    yield store
    store.close()


def _hold_run_lock(store: ScheduleStore) -> None:
    with store.run_lock("hourly"):
        pass


SPEC = make_spec(name="hourly", container="photos", service="eastus", every="1h")
RUN = RunRecord("20261126T150102-1a2b3c4d", 1_764_169_262.5, 1_764_169_263.0, 3, 5, 1, "beat")
OPERATIONS: dict[str, Callable[[ScheduleStore], object]] = {
    "add": lambda store: store.add(SPEC),
    "get": lambda store: store.get("hourly"),
    "exists": lambda store: store.exists("hourly"),
    "names": lambda store: store.names(),
    "remove": lambda store: store.remove("hourly"),
    "infos": lambda store: store.infos(),
    "sync_config": lambda store: store.sync_config({"hourly": SPEC}),
    "history": lambda store: store.history("hourly"),
    "record_run": lambda store: store.record_run("hourly", RUN),
    "active_jobs": lambda store: store.active_jobs("hourly"),
    "drop_active": lambda store: store.drop_active("hourly", ["20261126T150102-1a2b3c4d"]),
    "run_lock": _hold_run_lock,
}


@pytest.mark.parametrize("operation", OPERATIONS.values(), ids=list(OPERATIONS))
def test_an_unreachable_redis_is_a_transient_error(dead_store: ScheduleStore,
                                                    operation: Callable[[ScheduleStore], object]) -> None:
    with pytest.raises(TransientError, match="Redis unreachable") as caught:
        operation(dead_store)
    assert isinstance(caught.value.__cause__, redis.ConnectionError)
