"""A real Prometheus scrapes a real worker and `blobscore exporter` during a small job, and promtool checks the
shipped configuration, alert rules and their unit tests (deploy/prometheus).

Prometheus and promtool come from Debian's `prometheus` package (scripts/ensure-prometheus.sh installs it); a
missing one fails these tests, it never skips them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from azure.storage.blob import BlobServiceClient
from pipeline_helpers import REPO, blobscore_env, start_standin, start_worker, wait_until_done
from shared_helpers import jpeg_bytes, run_cli, run_cli_json, settings_of

from deploy.local.procs import ManagedProcess, free_port

pytestmark = pytest.mark.integration

KEY = "prometheus-test-key"
SERVICE = "prom-svc"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "blobscore-dashboard.json"
GOOD_IMAGES = 6
BAD_FILES = {"bad/notes.jpg": b"a text file with a .jpg name\n", "bad/empty.jpg": b""}
INSTALL_HINT = "run scripts/ensure-prometheus.sh (Debian's prometheus package: prometheus and promtool)"


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}", pytrace=False)
    return found


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


# ------------------------------------------------------------------------------------------------------- promtool


def test_promtool_accepts_the_shipped_config_and_rules() -> None:
    promtool = _tool("promtool")
    config = _run(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS" in config.stdout
    rules = _run(promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_the_alert_rules_fire_as_their_unit_tests_say() -> None:
    promtool = _tool("promtool")
    tested = _run(promtool, "test", "rules", "alerts_test.yml", cwd=PROMETHEUS_DIR)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


# ------------------------------------------------------------------------------------------------------ scraping


class PrometheusApi:
    """The HTTP API of a Prometheus we started."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 (our own Prometheus on loopback)
            return json.loads(reply.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (fails the test on an error)."""
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The one value of an instant query, None when it has no result."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as reply:  # noqa: S310
                return bool(reply.status == 200)
        except OSError:
            return False


def _eventually(check: Callable[[], Any], what: str, timeout: float = 45.0) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: last {value!r}"
        time.sleep(0.5)


def _start_prometheus(workdir: Path, targets: dict[str, int]) -> tuple[ManagedProcess, PrometheusApi]:
    prometheus = _tool("prometheus")
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", workdir / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                           for job, port in targets.items()],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config), "utf-8")
    port = free_port()
    process = ManagedProcess.start(
        [prometheus, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], workdir / "prometheus.log", cwd=workdir,
    )
    api = PrometheusApi(port)
    deadline = time.monotonic() + 60
    while not api.ready():
        if not process.alive() or time.monotonic() > deadline:
            process.stop()
            pytest.fail(f"prometheus did not start:\n{(workdir / 'prometheus.log').read_text()[-3000:]}",
                        pytrace=False)
        time.sleep(0.2)
    return process, api


@pytest.fixture
def stack(tmp_path: Path, redis_url: str, azurite: Any, blob_service: BlobServiceClient) -> Iterator[dict[str, Any]]:
    """The stand-in, the exporter and Prometheus (scraping a worker port and the exporter) — the worker not yet."""
    _tool("prometheus")
    standin, scoring_port = start_standin(tmp_path, "--no-model", "--emulate-latency-ms", "5", "--service-name",
                                          SERVICE, key=KEY)
    container = f"prom-{uuid.uuid4().hex[:10]}"
    client = blob_service.create_container(container)
    for index in range(GOOD_IMAGES):
        client.upload_blob(f"img-{index}.jpg", jpeg_bytes(900 + index))
    for name, data in BAD_FILES.items():
        client.upload_blob(name, data)
    worker_port, exporter_port = free_port(), free_port()
    env = blobscore_env(broker_url=redis_url, connection_string=azurite.connection_string, scoring_port=scoring_port,
                        key=KEY, service_name=SERVICE,
                        extra={"BLOBSCORE_METRICS_PORT": str(worker_port), "BLOBSCORE_METRICS_HOST": "127.0.0.1"})
    exporter = ManagedProcess.start(
        [sys.executable, "-m", "producer.cli", "exporter", "--port", str(exporter_port), "--host", "127.0.0.1"],
        tmp_path / "exporter.log", env=env, cwd=tmp_path,
    )
    processes = [standin, exporter]
    try:
        exporter.wait_for_log("exporter listening", timeout=60)
        prometheus, api = _start_prometheus(tmp_path, {"worker": worker_port, "exporter": exporter_port})
        processes.append(prometheus)
        yield {"env": env, "cwd": tmp_path, "api": api, "container": container}
    finally:
        for process in reversed(processes):
            process.stop()


def _labels(sample: dict[str, Any], *names: str) -> tuple[str, ...]:
    return tuple(sample["metric"].get(name, "") for name in names)


def test_prometheus_scrapes_a_worker_and_the_exporter_and_finds_the_jobs_tally(
    stack: dict[str, Any], redis_url: str
) -> None:
    env, cwd, api = stack["env"], stack["cwd"], stack["api"]
    settings = settings_of(env)
    queue = settings.queue_for(SERVICE)
    _eventually(lambda: api.value('up{job="exporter"}') == 1, "the exporter is up")
    # No worker yet: the job waits, and the exporter tells Prometheus what `status` says.
    job_id = run_cli_json(env, cwd, "enqueue", "--container", stack["container"])["job_id"]
    before = run_cli_json(env, cwd, "status", job_id)
    selector = f'job_id="{job_id}"'
    _eventually(lambda: api.value(f"blobscore_job_listed{{{selector}}}") == before["listed"], "the job listed")
    assert api.value(f"blobscore_job_pending{{{selector}}}") == before["pending"]
    assert api.value(f"blobscore_job_ok{{{selector}}}") == 0
    assert (api.value('blobscore_jobs_active{job="exporter"}') or 0) >= 1
    with redis.Redis.from_url(redis_url) as client:
        depth = client.llen(queue)
    assert api.value(f'blobscore_queue_depth{{service="{SERVICE}"}}') == depth
    assert api.value(f'blobscore_queue_consumed{{service="{SERVICE}"}}') == 0
    assert api.value("blobscore_enqueue_window") == settings.enqueue_window

    worker = start_worker(env, cwd / "worker.log", concurrency=2)
    try:
        final = wait_until_done(env, cwd, job_id)
        assert (final["ok"], final["rejected"]) == (GOOD_IMAGES, len(BAD_FILES))
        docs = [json.loads(line) for line in run_cli(env, cwd, "results", job_id).splitlines()]
        tally = Counter((doc["status"], doc["error"]["code"] if doc["status"] == "rejected" else "") for doc in docs)
        assert tally == {("ok", ""): GOOD_IMAGES, ("rejected", "not_an_image"): 1, ("rejected", "empty"): 1}

        def scraped_tally() -> Counter[tuple[str, ...]] | None:
            found = Counter({_labels(sample, "status", "code"): int(float(sample["value"][1])) for sample in
                             api.query(f'sum by (status, code) (blobscore_images_total{{service="{SERVICE}"}})')})
            return found if found == tally else None

        _eventually(scraped_tally, f"blobscore_images_total equal to the job's tally {dict(tally)}")
        stage_counts = {_labels(sample, "stage")[0]: float(sample["value"][1]) for sample in api.query(
            f'sum by (stage) (blobscore_stage_seconds_count{{service="{SERVICE}"}})')}
        # Every file is downloaded, checked and gets a result; only the good ones reach the scorer.
        assert stage_counts == {"download": 8, "check": 8, "score": GOOD_IMAGES, "upload": 8}
        assert api.value(f'sum(blobscore_task_seconds_count{{service="{SERVICE}"}})') == 8
        assert api.value(f'sum(blobscore_images_in_flight{{service="{SERVICE}"}})') == 0
        assert api.value(f'blobscore_breaker_open{{service="{SERVICE}"}}') == 0
        assert api.value('blobscore_worker_concurrency{job="worker"}') == 2
        assert not api.query(f'blobscore_retries_total{{service="{SERVICE}"}} > 0')
        # The exporter: a live worker consumes the queue now, and the done job has left the running ones.
        _eventually(lambda: api.value(f'blobscore_queue_consumed{{service="{SERVICE}"}}') == 1, "the queue consumed")
        _eventually(lambda: not api.query(f"blobscore_job_pending{{{selector}}}"), "the done job dropped")
        assert api.value("blobscore_exporter_redis_up") == 1
        _check_dashboard_queries(api)
        _check_rules_evaluate(api)
    finally:
        worker.stop()


def _check_dashboard_queries(api: PrometheusApi) -> None:
    """Every query of the shipped dashboard runs on this Prometheus (variables filled in as Grafana would)."""
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$service", ".*")
            assert "$" not in expr, expr
            api.query(expr)
    # rate() needs two samples of a series: a series born at the job's last image has one until the next scrape.
    _eventually(lambda: api.query(f'sum by (service) (rate(blobscore_images_total{{service=~"{SERVICE}"}}[1m]))'),
                "the Images/s panel shows the service")


def _check_rules_evaluate(api: PrometheusApi) -> None:
    """The shipped alert and recording rules evaluate without errors against real series."""
    def evaluated() -> list[dict[str, Any]] | None:
        rules = [rule for group in api.get("/api/v1/rules")["data"]["groups"] for rule in group["rules"]]
        return rules if rules and all(rule.get("lastEvaluation", "").startswith("2") for rule in rules) else None

    rules = _eventually(evaluated, "every rule evaluated")
    assert {rule["health"] for rule in rules} == {"ok"}, [rule for rule in rules if rule["health"] != "ok"]
    assert len(rules) == 11
