"""The fleet carries a job's listing: `enqueue` returns at once, and a killed carrier's page is redone, not lost.

A container larger than the window, listed by workers a page (= the window) at a time while they score.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from fault_helpers import Processes, assert_clean, kill9, start_worker, wait_for
from shared_helpers import jpeg_bytes, run_cli_json

Report = Callable[[dict[str, Any]], None]
IMAGES = 60
WINDOW = 8
# The production visibility timeout: a killed carrier's step comes back through the workers' leases.
LONG_VISIBILITY = {"BLOBSCORE_VISIBILITY_TIMEOUT_S": "240"}


def _images(count: int, seed: int) -> dict[str, bytes]:
    return {f"img-{index:03d}.jpg": jpeg_bytes(seed + index, (64, 48)) for index in range(count)}


@pytest.mark.timeout(180)
def test_enqueue_returns_at_once_and_the_fleet_lists_through_a_carrier_kill(
    make_job: Any, procs: Processes, fault_report: Report
) -> None:
    job = make_job(extra=LONG_VISIBILITY)
    job.start_standin(procs, "--emulate-latency-ms", "300")
    job.upload(_images(IMAGES, seed=3000))
    started = time.monotonic()
    created = run_cli_json(job.env, job.workdir, "enqueue", "--container", job.container, "--window", str(WINDOW))
    returned_s = time.monotonic() - started
    job.job_id, job.listed = created["job_id"], IMAGES
    assert created["state"] == "listing"
    # No worker yet: nothing carries the listing, and status says so.
    status = job.status()
    assert (status["state"], status["listed"]) == ("listing", 0)
    first = start_worker(procs, job.env, job.workdir / "worker-1.log", concurrency=2)
    wait_for(lambda: 2 * WINDOW <= job.status()["listed"] < IMAGES, 60, "the listing under way")
    killed_at = kill9(first)  # the only carrier, mid-listing, holding a listing step and image tasks
    listed_at_kill = job.status()["listed"]
    start_worker(procs, job.env, job.workdir / "worker-2.log", concurrency=2)
    done_at = job.wait_done(120)
    tally = job.tally(enqueue_returned_s=round(returned_s, 2), listed_at_kill=listed_at_kill,
                      recovery_s=round(done_at - killed_at, 1))
    fault_report(tally)
    assert_clean(tally)
    assert tally["ok"] == IMAGES
    assert job.status()["listed"] == IMAGES  # every image listed exactly once, whatever was redone
    assert all(count == 1 for count in job.result_writes().values())
