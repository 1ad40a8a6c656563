"""The listing carrier's hand-offs on real Redis and Azurite: a next step taken before its sender moved the
generation on, a sender that died in between, and the step lock."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from shared_helpers import container_of_jpegs

from producer.carrier import CarrierDeps, StepLock, StepOutcome, list_step
from worker.contracts import ImageTask
from worker.jobs import JobSpec, JobStore
from worker.settings import load_settings
from worker.storage import BlobStore

pytestmark = pytest.mark.integration

IMAGES = 14
PAGE = 3
SERVICE = "carrier-svc"


class SenderDied(Exception):
    """Stands for a kill -9 of the step's worker right after it sent the next step."""


class Carrier:
    """A job on real stores, its step messages kept in order, and every image task published for it."""

    def __init__(self, tmp_path: Path, redis_url: str, azurite: Any, container: str) -> None:
        settings = load_settings(tmp_path, broker_url=redis_url, queue=f"carrier-{uuid.uuid4().hex[:8]}",
                                 service=SERVICE, blob_connection_string=azurite.connection_string)
        self.jobs = JobStore.from_settings(settings)
        spec = JobSpec(container, "", SERVICE, container, f"blobscore-results/{SERVICE}/")
        self.job_id = self.jobs.create(spec, settings.deployment,
                                       extra={"window": 1000, "page_size": PAGE, "limit": ""})
        self.jobs.bump_listing_generation(self.job_id, 0)  # as start_listing does before the first step
        self.messages: list[int] = [1]
        self.published: list[str] = []
        self.on_send: Callable[[int], None] = lambda _generation: None
        self.deps = CarrierDeps(BlobStore.from_settings(settings), self.jobs, self._publish, self._send)

    def _publish(self, _service: str, tasks: list[ImageTask]) -> None:
        self.published.extend(task.blob for task in tasks)

    def _send(self, _job_id: str, generation: int, _countdown: float) -> None:
        self.messages.append(generation)
        self.on_send(generation)

    def step(self, generation: int) -> StepOutcome:
        return list_step(self.job_id, generation, self.deps)

    def drain(self) -> list[str]:
        """Deliver the queued step messages in order until none is left; their actions."""
        actions = []
        while self.messages:
            actions.append(self.step(self.messages.pop(0)).action)
        return actions


@pytest.fixture
def photos(blob_service: BlobServiceClient) -> str:
    return container_of_jpegs(blob_service, "carrier", IMAGES, (16, 12))


def _listed_once(carrier: Carrier) -> None:
    fields = carrier.jobs.fields(carrier.job_id)
    assert fields["listing_done"] == "1"
    assert int(fields["listed"]) == IMAGES
    assert sorted(carrier.published) == [f"img-{number:03d}.jpg" for number in range(IMAGES)]


def test_a_next_step_taken_before_its_sender_moved_on_carries_the_listing(
    tmp_path: Path, redis_url: str, azurite: Any, photos: str
) -> None:
    carrier = Carrier(tmp_path, redis_url, azurite, photos)
    nested: list[str] = []

    def take_at_once(generation: int) -> None:
        # Another thread takes the message the moment it exists: the sender has not moved the generation on yet.
        if not nested:
            nested.append("taken")
            carrier.messages.remove(generation)
            nested[0] = carrier.step(generation).action

    carrier.on_send = take_at_once
    first = carrier.step(carrier.messages.pop(0)).action
    carrier.on_send = lambda _generation: None
    actions = carrier.drain()
    # The early message was the chain's next step, not a stale one: five pages, five steps, none wasted.
    assert [first, *nested, *actions] == ["listed", "listed", "listed", "listed", "done"]
    _listed_once(carrier)


@pytest.mark.parametrize("its_own_first", [False, True], ids=["the step it sent first", "its own message first"])
def test_a_sender_killed_between_sending_and_moving_on_loses_no_page_and_lists_none_twice(
    tmp_path: Path, redis_url: str, azurite: Any, photos: str, its_own_first: bool
) -> None:
    carrier = Carrier(tmp_path, redis_url, azurite, photos)

    def die(_generation: int) -> None:
        raise SenderDied

    carrier.on_send = die
    generation = carrier.messages.pop(0)
    with pytest.raises(SenderDied):
        carrier.step(generation)
    carrier.on_send = lambda _generation: None
    # Its own message comes back (acks late, lease), before or after the next one it sent.
    carrier.messages.insert(0 if its_own_first else 1, generation)
    actions = carrier.drain()
    assert actions.count("stale") == 1  # one of the two messages of one generation is collapsed
    assert actions.count("listed") == -(-IMAGES // PAGE) - 2  # the dead sender's page and the last one aside
    assert actions[-1] == "done"
    _listed_once(carrier)


def test_the_step_lock_admits_one_step_and_a_release_drops_only_its_own_hold(
    tmp_path: Path, redis_url: str, azurite: Any, photos: str
) -> None:
    carrier = Carrier(tmp_path, redis_url, azurite, photos)
    first, second = StepLock(carrier.jobs, carrier.job_id), StepLock(carrier.jobs, carrier.job_id)
    assert first.take()
    assert not second.take()
    second.release()  # not its lock: the first still holds it
    assert not second.take()
    asked_again: list[int] = []
    carrier.deps = CarrierDeps(carrier.deps.store, carrier.jobs, carrier.deps.publish_images,
                               lambda _job, generation, countdown: asked_again.append(generation))
    assert carrier.step(1).action == "busy"
    assert asked_again == [1]  # deferred, not dropped
    first.release()
    assert second.take()
    second.release()
    assert carrier.step(1).action == "listed"
