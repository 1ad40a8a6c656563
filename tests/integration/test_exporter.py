"""The exporter's collector on a real Redis: a 200,000-image job, a done job, a queue, a live worker, a schedule —
what one scrape reports, and that it stays a handful of round trips (bench/metrics_cost.py measures the time)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from prometheus_client.metrics_core import Metric

from producer.exporter import FleetCollector
from producer.scheduling.spec import ScheduleSpec
from producer.scheduling.store import RunRecord, ScheduleStore
from worker.deployment import AccountRef, Deployment
from worker.jobs import JobSpec, JobStore
from worker.presence import Presence
from worker.settings import Settings

pytestmark = pytest.mark.integration

IMAGES = 200_000
PAGE = 5000


class CountingConnection(redis.Connection):
    """Counts round trips: what reaches the socket (a pipeline is one)."""

    round_trips = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.round_trips += 1
        super().send_packed_command(command, check_health)


def _values(families: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in families for sample in family.samples}


@pytest.fixture
def fleet(redis_url: str) -> Iterator[dict[str, Any]]:
    """A deployment of its own on the test Redis: a 200k-image job half done, a done job, a queue, a schedule."""
    settings = Settings(broker_url=redis_url, queue=f"test-{uuid.uuid4().hex[:8]}", namespace="exporter-test",
                        service="exp-svc")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    jobs = JobStore(client, settings.key_prefix)
    origin = Deployment(settings.namespace_in_use, AccountRef("devstoreaccount1", "127.0.0.1:10000/devstoreaccount1"))
    spec = JobSpec("photos", "", "exp-svc", "photos", "blobscore-results/exp-svc/")
    big = jobs.create(spec, origin, job_id="20260101T000000-big00000")
    for page in range(IMAGES // PAGE):
        jobs.record_page(big, page, page * PAGE, [f"2026/01/{page:03d}/img-{index:06d}.jpg" for index in range(PAGE)])
    jobs.advance(big, "token", 160_000, IMAGES // PAGE)
    jobs.finish_listing(big)
    for index in range(50):
        jobs.record_outcome(big, index, f"img-{index}.jpg", "ok" if index % 10 else "rejected")
    client.hset(f"{settings.key_prefix}job:{big}", mapping={"ok": 120_000, "rejected": 3_000})
    for index in range(5):
        jobs.record_retry(big, f"retrying-{index}.jpg")
    done = jobs.create(spec, origin, job_id="20260101T000000-done0000")
    jobs.record_page(done, 0, 0, ["a.jpg", "b.jpg"])
    jobs.finish_listing(done)
    jobs.record_outcome(done, 0, "a.jpg", "ok")
    jobs.record_outcome(done, 1, "b.jpg", "rejected")
    listing = jobs.create(spec, origin, job_id="20260101T000001-list0000")
    queue = settings.queue_for("exp-svc")
    client.rpush(queue, *[f"message-{index}" for index in range(500)])
    Presence(settings.key_prefix, [queue]).beat(client)
    schedules = ScheduleStore.from_settings(settings)
    schedules.add(ScheduleSpec(name="nightly", container="photos", service="exp-svc", cron="0 2 * * *"))
    schedules.record_run("nightly", RunRecord(listing, 1_700_000_000.0, 1_700_000_060.0, 42, 7, 0, "beat"))
    counted = redis.Redis.from_url(redis_url, decode_responses=True, connection_class=CountingConnection)
    try:
        yield {"settings": settings, "client": counted, "schedules": schedules, "big": big, "done": done,
               "listing": listing, "queue": queue}
    finally:
        schedules.remove("nightly")
        schedules.close()
        keys = list(client.scan_iter(match=f"{settings.queue}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start:start + 1000])
        counted.close()
        client.close()


def test_one_scrape_reports_the_fleet(fleet: dict[str, Any]) -> None:
    settings, client = fleet["settings"], fleet["client"]
    collector = FleetCollector(settings, client, client, fleet["schedules"])
    values = _values(list(collector.collect()))
    big = (("job_id", fleet["big"]), ("service", "exp-svc"))
    assert values[("blobscore_job_listed", big)] == IMAGES
    assert values[("blobscore_job_ok", big)] == 120_000
    assert values[("blobscore_job_rejected", big)] == 3_000
    assert values[("blobscore_job_retrying", big)] == 5
    assert values[("blobscore_job_pending", big)] == IMAGES - 123_000
    assert values[("blobscore_job_tasks_waiting", big)] == 160_000 - 123_000
    assert values[("blobscore_job_window", big)] == settings.enqueue_window
    assert values[("blobscore_job_listing_done", big)] == 1
    listing = (("job_id", fleet["listing"]), ("service", "exp-svc"))
    assert values[("blobscore_job_listing_done", listing)] == 0
    assert not [key for key in values if ("job_id", fleet["done"]) in key[1]], "a done job is not reported"
    assert values[("blobscore_jobs_active", ())] == 2
    queue = (("queue", fleet["queue"]), ("service", "exp-svc"))
    assert values[("blobscore_queue_depth", queue)] == 500
    assert values[("blobscore_queue_consumed", queue)] == 1
    assert values[("blobscore_queue_worker_seen_age_seconds", queue)] < 15
    assert ("blobscore_queue_task_taken_age_seconds", queue) not in values, "no task was ever taken"
    nightly = (("schedule", "nightly"),)
    assert values[("blobscore_schedule_last_run_timestamp_seconds", nightly)] == 1_700_000_000.0
    assert values[("blobscore_schedule_last_run_images", nightly)] == 42
    assert values[("blobscore_schedule_runs_total", nightly)] == 1
    assert values[("blobscore_schedule_next_run_timestamp_seconds", nightly)] > time.time()
    assert values[("blobscore_exporter_redis_up", ())] == 1
    assert values[("blobscore_enqueue_window", ())] == settings.enqueue_window


def test_a_scrape_is_a_few_round_trips_whatever_the_job_size(fleet: dict[str, Any]) -> None:
    settings, client = fleet["settings"], fleet["client"]
    collector = FleetCollector(settings, client, client)  # schedules: their own client, ~5 calls each
    list(collector.collect())  # the first scrape learns which jobs are done
    CountingConnection.round_trips = 0
    started = time.perf_counter()
    list(collector.collect())
    elapsed = time.perf_counter() - started
    # SCAN over the test database (other tests' keys too: the 200k job alone is ~45 keys; SCAN walks 1,000 a call),
    # then one pipeline each for the running jobs' records, their retrying sets, the queue depths and the presence
    # stamps: nothing grows with the number of images.
    keys = int(client.dbsize())
    scans = keys // 1000 + 1
    assert CountingConnection.round_trips <= scans + 4 + 1, (CountingConnection.round_trips, keys)
    assert elapsed < 2.0, elapsed


def test_an_unreachable_redis_is_reported_not_raised(fleet: dict[str, Any]) -> None:
    nowhere = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, decode_responses=True)
    collector = FleetCollector(fleet["settings"], nowhere, nowhere)
    values = _values(list(collector.collect()))
    assert values[("blobscore_exporter_redis_up", ())] == 0
    assert not [key for key in values if key[0].startswith("blobscore_job")]
