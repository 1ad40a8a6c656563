"""Schedules on the real stack: `blobscore beat` processes, a worker, the stand-in, Azurite and a Redis of our own.

The Redis is private to this module (a redis-server with appendonly on a free port): the tests restart it, and the
shared test database is flushed by other sessions.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from azure.storage.blob import BlobServiceClient
from pipeline_helpers import blobscore_env, read_stats, start_standin, start_worker
from shared_helpers import jpeg_bytes

from deploy.local.procs import ManagedProcess, free_port
from deploy.local.redis_local import start_redis
from producer.scheduling.app import schedules_app
from producer.scheduling.run import RunResources, run_now
from producer.scheduling.spec import make_spec
from producer.scheduling.store import RunRecord, ScheduleStore
from worker.jobs import JobStore
from worker.settings import Settings, load_settings

pytestmark = pytest.mark.integration

KEY = "schedules-secret-key"
SERVICE = "sched-svc"
RESULTS = f"blobscore-results/{SERVICE}/"
# The schedules CLI; `blobscore schedule ...` / `blobscore beat` once mounted on producer.cli.
CLI = "producer.cli"
T = TypeVar("T")
# How much the time a run starts may lag beat's sending it more than the run before lagged (observed: milliseconds).
PICKUP_JITTER_S = 0.25


@dataclass
class PrivateRedis:
    """A redis-server with appendonly that the tests may stop and start again on the same port and directory."""

    port: int
    workdir: Path
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def restart(self, down_s: float = 0.0) -> None:
        self.process.stop()
        time.sleep(down_s)
        self.process = start_redis(self.port, self.workdir, appendonly=True)


@dataclass(frozen=True)
class Stack:
    """What every test of this module shares."""

    redis: PrivateRedis
    env: dict[str, str]
    workdir: Path
    stats_file: Path
    worker: ManagedProcess


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    workdir = tmp_path_factory.mktemp("schedules-redis")
    port = free_port()
    server = PrivateRedis(port, workdir, start_redis(port, workdir, appendonly=True))
    yield server
    server.process.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, private_redis: PrivateRedis, azurite: Any) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("schedules")
    stats_file = workdir / "standin-stats.json"
    standin, port = start_standin(workdir, "--model", "resnet50", "--no-model", "--emulate-latency-ms", "1",
                                  "--service-name", SERVICE, "--stats-file", str(stats_file), key=KEY)
    env = blobscore_env(broker_url=private_redis.url, connection_string=azurite.connection_string,
                        scoring_port=port, key=KEY, service_name=SERVICE)
    worker = start_worker(env, workdir / "worker.log")
    try:
        yield Stack(private_redis, env, workdir, stats_file, worker)
    finally:
        worker.stop()
        standin.stop()


def _settings(stack: Stack) -> Settings:
    return load_settings(stack.workdir, broker_url=stack.redis.url, queue=stack.env["BLOBSCORE_QUEUE"],
                         service=SERVICE, blob_connection_string=stack.env["BLOBSCORE_BLOB_CONNECTION_STRING"])


def _run_cli(stack: Stack, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", CLI, *args], env=stack.env, cwd=cwd or stack.workdir,
                          capture_output=True, text=True, timeout=60, check=False)


def _cli(stack: Stack, *args: str, cwd: Path | None = None) -> str:
    completed = _run_cli(stack, *args, cwd=cwd)
    assert completed.returncode == 0, f"{CLI} {' '.join(args)} failed:\n{completed.stderr}"
    return completed.stdout


def _start_beat(stack: Stack, log: Path, cwd: Path | None = None) -> ManagedProcess:
    process = ManagedProcess.start([sys.executable, "-m", CLI, "beat"], log, env=stack.env, cwd=cwd or stack.workdir)
    process.wait_for_log(r"ready\.", timeout=30)
    return process


def _wait_for(check: Callable[[], T | None], timeout: float, what: str, poll_s: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found is not None and found is not False:
            return found
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(poll_s)


def _container(blob_service: BlobServiceClient, images: dict[str, bytes]) -> str:
    name = f"sched-{uuid.uuid4().hex[:12]}"
    container = blob_service.create_container(name)
    for blob, data in images.items():
        container.upload_blob(blob, data, overwrite=True)
    return name


def _result_etags(blob_service: BlobServiceClient, container: str) -> dict[str, str]:
    listing = blob_service.get_container_client(container).list_blobs(name_starts_with=RESULTS)
    return {blob.name[len(RESULTS):-len(".json")]: blob.etag for blob in listing}


def _new_run(store: ScheduleStore, name: str, after: int) -> RunRecord | None:
    """The run after the first `after` runs of the schedule, once recorded."""
    history = store.history(name)
    return history[len(history) - after - 1] if len(history) > after else None


def _wait_done(jobs: JobStore, job_id: str, timeout: float = 30) -> None:
    _wait_for(lambda: jobs.status(job_id).state == "done", timeout, f"job {job_id} to finish")


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_a_schedule_fires_on_its_own_and_scores_only_new_and_changed_images(
    stack: Stack, blob_service: BlobServiceClient
) -> None:
    first = {f"img-{number}.jpg": jpeg_bytes(number) for number in range(5)}
    container = _container(blob_service, first)
    calls_before = read_stats(stack.stats_file)["predict_calls"]
    _cli(stack, "schedule", "add", "incremental", "--container", container, "--service", SERVICE, "--every", "3s")
    settings = _settings(stack)
    store, jobs = ScheduleStore.from_settings(settings), JobStore.from_settings(settings)
    beat = _start_beat(stack, stack.workdir / "beat-incremental.log")
    try:
        # The first run, fired by beat on its own, queues every image.
        run = _wait_for(lambda: _new_run(store, "incremental", 0), 15, "the first run")
        assert run.trigger == "beat"
        assert (run.listed, run.skipped_current) == (5, 0)
        assert run.job_id is not None
        _wait_done(jobs, run.job_id)
        assert read_stats(stack.stats_file)["predict_calls"] == calls_before + 5
        etags = _result_etags(blob_service, container)
        assert set(etags) == set(first)
        # The next run finds nothing new: it queues nothing and nothing is scored.
        idle = _wait_for(lambda: _new_run(store, "incremental", 1), 10, "the second run")
        assert idle.listed == 0
        assert idle.skipped_current + idle.excluded_in_flight == 5  # current, or still in flight on a slow machine
        assert jobs.status(str(idle.job_id)).state == "done"
        # Right after a run: two new images and one overwritten, then the next run queues exactly those three.
        seen = len(store.history("incremental"))
        _wait_for(lambda: _new_run(store, "incremental", seen), 10, "a run to change images after")
        changed = {"img-5.jpg": jpeg_bytes(105), "img-6.jpg": jpeg_bytes(106), "img-2.jpg": jpeg_bytes(102)}
        for blob, data in changed.items():
            blob_service.get_blob_client(container, blob).upload_blob(data, overwrite=True)
        runs_before = len(store.history("incremental"))
        calls_before = read_stats(stack.stats_file)["predict_calls"]
        rerun = _wait_for(lambda: _new_run(store, "incremental", runs_before), 10, "the run after the change")
        history = store.history("incremental")
        assert (rerun.listed, rerun.skipped_current) == (3, 4)
        _wait_done(jobs, str(rerun.job_id))
        stats = read_stats(stack.stats_file)
        assert stats["predict_calls"] == calls_before + 3
        assert all(stats["by_sha256"][_sha(data)] == 1 for data in changed.values())
        after = _result_etags(blob_service, container)
        assert {blob for blob in after if after[blob] != etags.get(blob)} == set(changed)
        # The schedule shows its last run and job, and its next run.
        listed = store.info("incremental").to_dict()
        assert listed["last_job_id"] == store.history("incremental")[0].job_id
        assert listed["next_run_at"] is not None
    finally:
        beat.stop()
        store.close()
        jobs.close()
    # With beat stopped, `schedule run` runs it now, in the CLI's process: the one new image, as a job of its own.
    blob_service.get_blob_client(container, "img-7.jpg").upload_blob(jpeg_bytes(107))
    manual = json.loads(_cli(stack, "schedule", "run", "incremental", "--json"))
    assert (manual["listed"], manual["skipped_current"], manual["trigger"]) == (1, 7, "manual")
    assert manual["job_id"] not in {run.job_id for run in history}
    _cli(stack, "schedule", "remove", "incremental")


def test_a_run_never_queues_what_an_unfinished_run_still_has_queued(
    stack: Stack, blob_service: BlobServiceClient, tmp_path: Path
) -> None:
    # A queue base no worker consumes: the runs' tasks stay queued, their jobs unfinished.
    settings = load_settings(tmp_path, broker_url=stack.redis.url, queue=f"idle-{uuid.uuid4().hex[:8]}",
                             service=SERVICE, blob_connection_string=stack.env["BLOBSCORE_BLOB_CONNECTION_STRING"])
    container = _container(blob_service, {f"img-{number}.jpg": jpeg_bytes(300 + number) for number in range(3)})
    spec = make_spec(name="overlap", container=container, service=SERVICE, every="1h")
    resources = RunResources(settings, schedules_app(settings))
    _, jobs, schedules = resources.get()
    schedules.add(spec)
    broker = redis.Redis.from_url(stack.redis.url)
    try:
        first = run_now(spec, settings, resources, "manual")
        assert (first.listed, first.excluded_in_flight) == (3, 0)
        assert jobs.status(str(first.job_id)).state == "running"
        # The first run's job is still running: the second run queues none of its images again.
        second = run_now(spec, settings, resources, "manual")
        assert (second.listed, second.skipped_current, second.excluded_in_flight) == (0, 0, 3)
        blob_service.get_blob_client(container, "img-9.jpg").upload_blob(jpeg_bytes(309))
        third = run_now(spec, settings, resources, "manual")
        assert (third.listed, third.excluded_in_flight) == (1, 3)
        assert broker.llen(settings.queue_for(SERVICE)) == 4
        assert [run.job_id for run in schedules.history("overlap")] == [third.job_id, second.job_id, first.job_id]
        # While a run holds the schedule's lock, another run of it does nothing.
        with schedules.run_lock("overlap") as held:
            assert held
            busy = run_now(spec, settings, resources, "manual")
        assert busy.busy
        assert busy.job_id is None
        assert broker.llen(settings.queue_for(SERVICE)) == 4
        assert len(schedules.history("overlap")) == 3
    finally:
        schedules.remove("overlap")
        broker.delete(settings.queue_for(SERVICE))
        broker.close()
        resources.close()


def test_two_beats_at_once_fire_each_run_once(stack: Stack, blob_service: BlobServiceClient) -> None:
    container = _container(blob_service, {"one.jpg": jpeg_bytes(1)})
    interval, window = 2.0, 10.0
    _cli(stack, "schedule", "add", "twin", "--container", container, "--service", SERVICE, "--every", "2s")
    store = ScheduleStore.from_settings(_settings(stack))
    logs = [stack.workdir / "beat-twin-1.log", stack.workdir / "beat-twin-2.log"]
    beats = [_start_beat(stack, logs[0]), _start_beat(stack, logs[1])]
    try:
        _wait_for(lambda: store.history("twin"), 10, "a first run")
        holders = [log for log in logs if "beat: Acquired lock" in log.read_text()]
        assert len(holders) == 1, "exactly one beat holds the lock"
        sent_before = sum(_sent(log, "twin") for log in logs)
        start = time.time()
        time.sleep(window)
        end = time.time()
        sent = sum(_sent(log, "twin") for log in logs) - sent_before
        runs = [run for run in store.history("twin") if start <= run.started_at < end]
        expected = window / interval
        assert expected - 2 <= sent <= expected + 1, f"{sent} runs fired in {window} s at one per {interval} s"
        assert expected - 2 <= len(runs) <= expected + 1
        assert sum(run.listed for run in store.history("twin")) == 1  # the one image was queued once
        # The lock holder stops: the other beat takes over at once and the schedule keeps firing.
        holder = beats[logs.index(holders[0])]
        standby_log = logs[1 - logs.index(holders[0])]
        holder.stop()
        _wait_for(lambda: "beat: Acquired lock" in standby_log.read_text(), 10, "the standby beat to take over")
        seen = len(store.history("twin"))
        _wait_for(lambda: _new_run(store, "twin", seen), 10, "a run fired by the beat that took over")
    finally:
        for beat in beats:
            beat.stop()
        store.close()
    _cli(stack, "schedule", "remove", "twin")


def _sent(log: Path, name: str) -> int:
    return len(re.findall(rf"Sending due task {re.escape(name)} ", log.read_text()))


def test_schedules_survive_restarts_of_beat_and_redis(stack: Stack, blob_service: BlobServiceClient) -> None:
    container = _container(blob_service, {"a.jpg": jpeg_bytes(11)})
    _cli(stack, "schedule", "add", "durable", "--container", container, "--service", SERVICE, "--every", "2s")
    # A schedule declared in the config file of the directory beat starts in.
    config_dir = stack.workdir / "with-config"
    config_dir.mkdir()
    (config_dir / "blobscore.toml").write_text(
        f'[schedules.declared]\ncontainer = "{container}"\nservice = "{SERVICE}"\ncron = "0 3 * * *"\n'
    )
    settings = _settings(stack)
    store = ScheduleStore.from_settings(settings)
    beat = _start_beat(stack, stack.workdir / "beat-durable-1.log", cwd=config_dir)
    try:
        _wait_for(lambda: _new_run(store, "durable", 0), 10, "a first run")
        listed = _list(stack)
        assert listed["declared"]["origin"] == "config"
        assert listed["declared"]["when"] == "cron 0 3 * * *"
        assert listed["durable"]["origin"] == "cli"
        # Redis restarts under a running beat: the schedule is still there and beat keeps firing it.
        stack.redis.restart(down_s=1.5)
        seen = len(store.history("durable"))
        _wait_for(lambda: _new_run(store, "durable", seen), 20, "a run after Redis came back")
    finally:
        beat.stop()
    # Beat and Redis both restart: the schedule, its last job and its history are all kept.
    last_job = store.history("durable")[0].job_id
    runs = len(store.history("durable"))
    stack.redis.restart()
    listed = _list(stack)
    assert listed["durable"]["last_job_id"] == last_job
    assert listed["durable"]["runs"] == runs
    (config_dir / "blobscore.toml").write_text("")  # the declared schedule is gone from the file
    beat = _start_beat(stack, stack.workdir / "beat-durable-2.log", cwd=config_dir)
    try:
        _wait_for(lambda: _new_run(store, "durable", runs), 10, "a run after beat and Redis restarted")
        assert set(_list(stack)) == {"durable"}  # the sync removed the config schedule, not the CLI one
    finally:
        beat.stop()
        store.close()
    _cli(stack, "schedule", "remove", "durable")


def _list(stack: Stack) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(_cli(stack, "schedule", "list", "--json"))
    return parsed


def _instant(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def test_schedule_list_shows_a_next_run_that_stays_put(stack: Stack, blob_service: BlobServiceClient) -> None:
    container = _container(blob_service, {"a.jpg": jpeg_bytes(31)})
    # A cron hour one to two hours ahead: its next run cannot pass while the test lists.
    cron_hour = (datetime.now(UTC) + timedelta(hours=2)).hour
    added_after = datetime.now(UTC).replace(microsecond=0)
    _cli(stack, "schedule", "add", "steady-every", "--container", container, "--service", SERVICE, "--every", "1h")
    _cli(stack, "schedule", "add", "steady-cron", "--container", container, "--service", SERVICE,
         "--cron", f"0 {cron_hour} * * *")
    added_before = datetime.now(UTC)
    try:
        seen = []
        for _ in range(3):
            listed = _list(stack)
            seen.append((listed["steady-every"]["next_run_at"], listed["steady-cron"]["next_run_at"]))
            time.sleep(2.5)
        assert len(set(seen)) == 1, f"the next run moved between lists: {seen}"
        every_next, cron_next = (_instant(value) for value in seen[0])
        # A new schedule first fires one interval after it was added; a cron one at its next matching time.
        assert added_after + timedelta(hours=1) <= every_next <= added_before + timedelta(hours=1)
        assert (cron_next.hour, cron_next.minute, cron_next.second) == (cron_hour, 0, 0)
        assert timedelta(hours=1) <= cron_next - added_after <= timedelta(hours=2)
    finally:
        _cli(stack, "schedule", "remove", "steady-every")
        _cli(stack, "schedule", "remove", "steady-cron")


def test_beat_never_fires_a_schedule_early(stack: Stack, blob_service: BlobServiceClient) -> None:
    container = _container(blob_service, {"a.jpg": jpeg_bytes(41)})
    period, runs_wanted = 2.0, 5
    _cli(stack, "schedule", "add", "paced", "--container", container, "--service", SERVICE, "--every", "2s")
    store = ScheduleStore.from_settings(_settings(stack))
    log = stack.workdir / "beat-paced.log"
    beat = _start_beat(stack, log)
    try:
        _wait_for(lambda: len(store.history("paced")) >= runs_wanted, period * runs_wanted + 15, "runs of paced")
    finally:
        beat.stop()
    starts = sorted(run.started_at for run in store.history("paced") if run.trigger == "beat")
    store.close()
    _cli(stack, "schedule", "remove", "paced")
    assert len(starts) >= runs_wanted
    # Beat sends each run at least one period after the one before.
    sent = _sent_at(log, "paced")
    assert len(sent) >= runs_wanted
    assert min(later - earlier for earlier, later in pairwise(sent)) >= period, f"sent at {sent}"
    # A run starts when a thread of beat's worker takes its message: that hop varies by milliseconds (the first run
    # also opens the connections), so two starts may be a little closer than the sends were, never by much.
    gaps = [later - earlier for earlier, later in pairwise(starts)]
    assert min(gaps) >= period - PICKUP_JITTER_S, f"runs started less than {period} s apart: gaps {gaps}"


def _sent_at(log: Path, name: str) -> list[float]:
    """When beat sent the schedule's runs, from its log lines (millisecond timestamps)."""
    stamps = re.findall(rf"^(\S+ \S+) INFO celery.beat: Scheduler: Sending due task {re.escape(name)} ",
                        log.read_text(), flags=re.MULTILINE)
    return [datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() for stamp in stamps]


def test_a_schedule_on_a_container_that_does_not_exist_is_refused(stack: Stack) -> None:
    missing = f"sched-missing-{uuid.uuid4().hex[:8]}"
    refused = _run_cli(stack, "schedule", "add", "nowhere", "--container", missing, "--service", SERVICE,
                       "--every", "1h")
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert f"container {missing} does not exist in storage account devstoreaccount1" in lines[0]
    assert "nowhere" not in _list(stack)
