"""Metrics, log lines, alert rules and the dashboard, without the stack: names, formats, redaction, counting."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
)

from producer.exporter import FleetCollector, JobRow, parse_job
from worker import logs, metrics
from worker.errors import TransientError
from worker.settings import Settings
from worker.worker_main import worker_argv

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "blobscore-dashboard.json"
METRIC_NAME = re.compile(r"\bblobscore_[a-z0-9_]+\b")
RECORDED_NAME = re.compile(r"\bblobscore:[a-z0-9_:]+\b")
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _sample(name: str, labels: dict[str, str]) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _known_names() -> set[str]:
    collector = FleetCollector(Settings(namespace="unit"), redis.Redis(), redis.Redis())
    return metrics.series_names(metrics.REGISTRY.collect()) | metrics.series_names(collector.describe())


def _rule_expressions() -> list[str]:
    document = yaml.safe_load(ALERTS.read_text("utf-8"))
    return [rule["expr"] for group in document["groups"] for rule in group["rules"]]


def _recorded_names() -> set[str]:
    document = yaml.safe_load(ALERTS.read_text("utf-8"))
    return {rule["record"] for group in document["groups"] for rule in group["rules"] if "record" in rule}


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    found = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    found += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    return found


# ------------------------------------------------------------------------------------------- rules and dashboard


def test_every_metric_the_rules_and_the_dashboard_use_exists_in_the_code() -> None:
    known = _known_names()
    expressions = _rule_expressions() + _dashboard_expressions()
    used = {name for expr in expressions for name in METRIC_NAME.findall(expr)}
    assert len(used) >= 20, sorted(used)
    assert used <= known, f"unknown metric names: {sorted(used - known)}"
    recorded = {name for expr in expressions for name in RECORDED_NAME.findall(expr)}
    assert recorded <= _recorded_names(), f"recording rules missing: {sorted(recorded - _recorded_names())}"


def test_the_rules_cover_the_five_alerts_and_the_dashboard_each_view() -> None:
    document = yaml.safe_load(ALERTS.read_text("utf-8"))
    alerts = {rule["alert"] for group in document["groups"] for rule in group["rules"] if "alert" in rule}
    assert {"BlobscoreJobStalled", "BlobscoreErrorRateHigh", "BlobscoreBreakerOpen",
            "BlobscoreQueueGrowingUnconsumed", "BlobscoreScoreLatencyOverBudget"} <= alerts
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Images/s", "Outcome mix", "Score latency (Predict call)", "Queue depth", "Circuit breaker"} <= titles
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert {variable["name"] for variable in dashboard["templating"]["list"]} == {"datasource", "service"}


def test_a_misspelt_name_would_be_caught() -> None:
    assert "blobscore_images_total" in _known_names()
    assert "blobscore_stage_seconds_bucket" in _known_names()
    assert "blobscore_job_pending" in _known_names()
    assert "blobscore_image_total" not in _known_names()


# ------------------------------------------------------------------------------------------------------- metrics


def test_an_image_outcome_counts_once_with_its_code_and_stage_times() -> None:
    labels = {"service": "unit-a", "status": "rejected", "code": "not_an_image"}
    before = _sample("blobscore_images_total", labels)
    metrics.observe_image("unit-a", "rejected", "not_an_image", True, {"download": 3.0, "check": 0.2, "upload": 4.0})
    assert _sample("blobscore_images_total", labels) == before + 1
    check = {"service": "unit-a", "stage": "check"}
    assert _sample("blobscore_stage_seconds_count", check) >= 1
    assert _sample("blobscore_stage_seconds_bucket", {**check, "le": "0.0005"}) >= 1
    metrics.observe_image("unit-a", "ok", None, True, {"score": 12.0})
    assert _sample("blobscore_images_total", {"service": "unit-a", "status": "ok", "code": ""}) >= 1
    before_found = _sample("blobscore_images_already_done_total", {"service": "unit-a"})
    metrics.observe_image("unit-a", "ok", None, False, {})
    assert _sample("blobscore_images_already_done_total", {"service": "unit-a"}) == before_found + 1


def test_blob_errors_are_counted_by_kind_before_they_are_translated() -> None:
    @metrics.counts_blob_errors
    @contextmanager
    def translated(what: str) -> Iterator[None]:
        try:
            yield
        except ResourceNotFoundError as exc:
            raise TransientError(f"{what}: translated") from exc

    before = _sample("blobscore_blob_errors_total", {"kind": "not_found"})
    with pytest.raises(TransientError, match="read x: translated"), translated("read x"):
        raise ResourceNotFoundError("gone")
    assert _sample("blobscore_blob_errors_total", {"kind": "not_found"}) == before + 1
    with translated("fine"):
        pass
    assert _sample("blobscore_blob_errors_total", {"kind": "not_found"}) == before + 1


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ResourceNotFoundError("x"), "not_found"),
        (ResourceExistsError("x"), "conflict"),
        (ClientAuthenticationError("x"), "auth"),
        (ServiceRequestError("x"), "unreachable"),
    ],
)
def test_blob_error_kinds(error: Exception, kind: str) -> None:
    assert metrics.blob_error_kind(error) == kind


def test_blob_error_kinds_of_http_statuses() -> None:
    def answered(status: int) -> HttpResponseError:
        error = HttpResponseError("x")
        error.status_code = status
        return error

    assert [metrics.blob_error_kind(answered(status)) for status in (429, 503, 408, 500, 416)] == [
        "throttled", "throttled", "timeout", "server_error", "client_error"]


def test_redis_errors_are_found_in_the_cause_chain() -> None:
    error = TransientError("record outcome: Redis unreachable")
    error.__cause__ = redis.ConnectionError("refused")
    assert metrics.redis_error_kind(error) == "connection"
    before = _sample("blobscore_redis_errors_total", {"kind": "connection"})
    metrics.observe_retry("unit-b", "TransientError", error)
    assert _sample("blobscore_redis_errors_total", {"kind": "connection"}) == before + 1
    assert _sample("blobscore_retries_total", {"service": "unit-b", "reason": "TransientError"}) >= 1
    assert metrics.redis_error_kind(TransientError("scoring")) is None
    assert metrics.redis_error_kind(redis.TimeoutError("slow")) == "timeout"


def test_grpc_errors_and_the_breaker_gauge() -> None:
    from grpc import StatusCode

    from worker.breaker import CircuitBreaker
    from worker.scoring import error_for_status

    before = _sample("blobscore_grpc_errors_total", {"service": "", "code": "UNAVAILABLE"})
    error_for_status(StatusCode.UNAVAILABLE, "down")
    assert _sample("blobscore_grpc_errors_total", {"service": "", "code": "UNAVAILABLE"}) == before + 1
    breaker = CircuitBreaker(redis.Redis(port=1, socket_connect_timeout=0.1), "unit-breaker", key_prefix="u:",
                             threshold=1, open_s=30)
    assert _sample("blobscore_breaker_open", {"service": "unit-breaker"}) == 0
    breaker.open_for("a refused key")  # Redis unreachable: the local state still opens
    assert _sample("blobscore_breaker_open", {"service": "unit-breaker"}) == 1


def test_the_metrics_port_and_log_settings() -> None:
    settings = Settings(namespace="unit")
    assert (settings.metrics_port, settings.log_format, settings.log_level) == (None, "text", "INFO")
    assert "--quiet" not in worker_argv(settings, ["q"])
    json_debug = Settings(namespace="unit", log_format="json", log_level="DEBUG", metrics_port=9100)
    argv = worker_argv(json_debug, ["q"])
    assert "--quiet" in argv
    assert "--loglevel=DEBUG" in argv


def test_a_taken_port_is_a_configuration_error() -> None:
    from worker.errors import ConfigurationError

    port = metrics.serve(0, "127.0.0.1")
    with pytest.raises(ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
        metrics.serve(port, "127.0.0.1")


# ---------------------------------------------------------------------------------------------------------- logs


def _line(log_format: logs.LogFormat, message: str, *args: object, level: int = logging.INFO,
          **extra: Any) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter(log_format))
    logger = logging.getLogger(f"unit.logs.{log_format}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.log(level, message, *args, **extra)
    return stream.getvalue()


def test_json_lines_carry_the_fields() -> None:
    text = _line("json", "image %s", "rejected", extra=logs.event(
        job_id="J1", blob="a dir/ä.jpg", service="s", code="not_an_image", download_ms=1.5, missing=None))
    assert text.endswith("\n")
    assert text.count("\n") == 1
    line = json.loads(text)
    assert line["message"] == "image rejected"
    assert line["level"] == "INFO"
    assert line["logger"] == "unit.logs.json"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    assert {key: line[key] for key in ("job_id", "blob", "service", "code", "download_ms")} == {
        "job_id": "J1", "blob": "a dir/ä.jpg", "service": "s", "code": "not_an_image", "download_ms": 1.5}
    assert "missing" not in line


def test_a_traceback_stays_inside_one_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        text = _line("json", "failed", level=logging.ERROR, exc_info=True)
    assert text.count("\n") == 1
    assert "ValueError: boom" in json.loads(text)["exc"]


def test_text_lines_stay_readable_with_the_fields_appended() -> None:
    text = _line("text", "image ok", extra=logs.event(job_id="J1", blob="a b.jpg", score_ms=2.5))
    assert re.search(r" INFO unit\.logs\.text: image ok job_id=J1 blob=\"a b\.jpg\" score_ms=2\.5$", text.strip())


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secrets_are_redacted_from_any_line(log_format: logs.LogFormat) -> None:
    secret_bits = (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
                   "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;")
    text = _line(log_format, "GET %s %s %s", "https://a.blob.core.windows.net/c/b.jpg?sv=2024&sig=abc%2Bdef&se=1",
                 secret_bits, "authorization: Bearer s3cr3t-key.xyz")
    for leaked in (AZURITE_KEY, "AccountKey=", "sig=", "abc%2Bdef", "s3cr3t-key"):
        assert leaked not in text
    if log_format == "json":
        assert "[redacted]" in json.loads(text)["message"]


def test_configure_replaces_the_handlers_and_quiets_the_noisy_libraries() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    stream = io.StringIO()
    try:
        logs.configure("DEBUG", "json", stream)
        assert len(root.handlers) == 1
        logging.getLogger("unit.configured").debug("hello")
        assert logging.getLogger("azure").level == logging.WARNING
        assert logging.getLogger("urllib3").level == logging.WARNING
    finally:
        logging.captureWarnings(False)
        root.handlers = saved
        root.setLevel(level)
    assert json.loads(stream.getvalue())["message"] == "hello"


# ------------------------------------------------------------------------------------------------------ exporter


def test_job_rows_from_records() -> None:
    row = parse_job("J", ["10", "4", "1", "8", "0", "s", "1700000000.5", None], 40_000)
    assert row == JobRow("J", "s", 10, 4, 1, 8, False, 1700000000.5, 40_000)
    assert (row.pending, row.waiting, row.done) == (5, 3, False)
    done = parse_job("D", ["10", "9", "1", "10", "1", "s", "1", "500"], 40_000)
    assert done is not None
    assert done.done
    assert done.window == 500
    assert parse_job("X", [None] * 8, 40_000) is None


def test_the_decorator_fits_the_blob_adapters_translation() -> None:
    """storage.py's `_translated` carries `@metrics.counts_blob_errors`: counted once, then translated as before."""
    from worker import storage

    translated = storage._translated
    before = _sample("blobscore_blob_errors_total", {"kind": "unreachable"})
    with pytest.raises(TransientError, match="download c/b: Blob Storage unreachable"), translated("download c/b"):
        raise ServiceRequestError("connection refused")
    assert _sample("blobscore_blob_errors_total", {"kind": "unreachable"}) == before + 1
    with pytest.raises(storage.BlobNotFoundError), translated("result c/r"):
        raise ResourceNotFoundError("no result yet")
