"""Schedules, pure parts: interval and cron parsing, spec validation, config tables, which in-flight images to skip,
when a schedule runs next."""

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from celery.schedules import crontab
from celery.schedules import schedule as interval_schedule

from producer.scheduling.app import BeatEntry, schedules_app, schedules_queue
from producer.scheduling.config import schedules_from_config
from producer.scheduling.run import STALE_RUN_S, triage_active, unfinished_images
from producer.scheduling.spec import (
    CRON_RUN_EXPIRES_S,
    InvalidScheduleError,
    ScheduleSpec,
    check_service,
    make_spec,
    next_run_at,
    parse_cron,
    parse_every,
)
from producer.scheduling.store import RunRecord
from worker.errors import ConfigurationError
from worker.services import ServiceConfig
from worker.settings import Settings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("1h", 3600), ("2d", 172_800), ("1h30m", 5400), (" 3S ", 3), ("1d 12h", 129_600)],
)
def test_every_accepts_a_number_and_a_unit(text: str, seconds: int) -> None:
    assert parse_every(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "1", "h", "1w", "1.5h", "-1h", "0s", "0m0s", "1h-30m", "every 1h", "1hx"])
def test_every_refuses_anything_else(text: str) -> None:
    with pytest.raises(InvalidScheduleError):
        parse_every(text)


def test_cron_has_five_fields_like_crontab() -> None:
    hourly = parse_cron("0 * * * *")
    assert isinstance(hourly, crontab)
    assert hourly.minute == {0}
    assert hourly.hour == set(range(24))
    weekdays = parse_cron("*/15 8-18 * * 1-5")
    assert weekdays.minute == {0, 15, 30, 45}
    assert weekdays.hour == set(range(8, 19))
    assert weekdays.day_of_week == {1, 2, 3, 4, 5}
    monthly = parse_cron("30 2 1 */3 *")
    assert (monthly.day_of_month, monthly.month_of_year) == ({1}, {1, 4, 7, 10})


@pytest.mark.parametrize("text", ["0 * * *", "0 * * * * *", "61 * * * *", "0 25 * * *", "x * * * *", ""])
def test_cron_refuses_malformed_expressions(text: str) -> None:
    with pytest.raises(InvalidScheduleError):
        parse_cron(text)


def _spec(**fields: object) -> ScheduleSpec:
    return make_spec(**{"name": "photos-hourly", "container": "photos", "service": "eastus", **fields})


def test_a_spec_needs_exactly_one_of_cron_and_every() -> None:
    assert _spec(every="1h").when == "every 1h"
    assert _spec(cron="0  *  * * *").when == "cron 0 * * * *"
    with pytest.raises(InvalidScheduleError, match="exactly one"):
        _spec()
    with pytest.raises(InvalidScheduleError, match="exactly one"):
        _spec(every="1h", cron="0 * * * *")


def test_a_spec_with_a_bad_timing_says_why() -> None:
    with pytest.raises(InvalidScheduleError, match=r"every.*unit"):
        _spec(every="soon")
    with pytest.raises(InvalidScheduleError, match="5 fields"):
        _spec(cron="hourly")


@pytest.mark.parametrize("name", ["", "has space", "a:b", "-leading", "x" * 101, "ünicode"])
def test_a_spec_name_is_safe_in_redis_keys(name: str) -> None:
    with pytest.raises(InvalidScheduleError):
        _spec(name=name, every="1h")


def test_a_spec_refuses_unknown_fields_and_empty_container() -> None:
    with pytest.raises(InvalidScheduleError, match=r"(?i)extra"):
        _spec(every="1h", key="secret")
    with pytest.raises(InvalidScheduleError, match="container"):
        _spec(every="1h", container="")


def test_the_celery_schedule_follows_the_spec() -> None:
    every = _spec(every="15m")
    built = every.celery_schedule()
    assert isinstance(built, interval_schedule)
    assert built.run_every == timedelta(minutes=15)
    assert every.run_expires_s() == 900
    cron = _spec(cron="0 * * * *")
    assert isinstance(cron.celery_schedule(), crontab)
    assert cron.run_expires_s() == CRON_RUN_EXPIRES_S


def test_the_task_argument_is_the_spec_as_plain_json() -> None:
    spec = _spec(every="1h", prefix="2026/", results_prefix="out/")
    args = spec.to_args()
    assert args == {"name": "photos-hourly", "container": "photos", "prefix": "2026/", "service": "eastus",
                    "cron": None, "every": "1h", "results_container": None, "results_prefix": "out/"}
    assert ScheduleSpec.model_validate(args) == spec


def _settings(**overrides: object) -> Settings:
    services = {"eastus": ServiceConfig(name="eastus", region="eastus", address="a.example")}
    return Settings(services=services, **overrides)  # type: ignore[arg-type]


def test_a_run_files_results_like_enqueue_does() -> None:
    spec = _spec(every="1h", prefix="2026/")
    job = spec.job_spec(_settings())
    assert (job.container, job.prefix, job.service) == ("photos", "2026/", "eastus")
    assert (job.results_container, job.results_prefix) == ("photos", "blobscore-results/eastus/")
    custom = _spec(every="1h", results_container="out", results_prefix="r/").job_spec(_settings())
    assert (custom.results_container, custom.results_prefix) == ("out", "r/")
    configured = spec.job_spec(_settings(results_container="all-results"))
    assert configured.results_container == "all-results"


def test_the_service_must_be_known() -> None:
    check_service(_spec(every="1h"), _settings())
    with pytest.raises(ConfigurationError, match="unknown service 'westus'"):
        check_service(_spec(every="1h", service="westus"), _settings())


def test_runs_have_a_queue_of_their_own() -> None:
    settings = _settings(queue="bs", namespace="prod")
    assert schedules_queue(settings) == "bs.prod:schedules"
    assert schedules_queue(settings) not in {settings.queue_for(name) for name in settings.all_services()}


def test_schedules_can_be_declared_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "blobscore.toml"
    config.write_text(
        '[blobscore]\nqueue = "bs"\n\n'
        '[schedules.hourly]\ncontainer = "photos"\nprefix = "2026/"\nservice = "eastus"\ncron = "0 * * * *"\n\n'
        '[schedules.often]\ncontainer = "inbox"\nservice = "eastus"\nevery = "15m"\n'
    )
    specs = schedules_from_config(config)
    assert set(specs) == {"hourly", "often"}
    assert specs["hourly"] == _spec(name="hourly", prefix="2026/", cron="0 * * * *")
    assert specs["often"].every == "15m"
    assert schedules_from_config(tmp_path / "missing.toml") == {}


def test_a_bad_config_schedule_names_its_table(tmp_path: Path) -> None:
    config = tmp_path / "blobscore.toml"
    config.write_text('[schedules.broken]\ncontainer = "photos"\nservice = "eastus"\nevery = "often"\n')
    with pytest.raises(InvalidScheduleError, match="broken"):
        schedules_from_config(config)


def test_only_running_jobs_keep_their_images_out_of_the_next_run() -> None:
    now = 1_000_000.0
    states = {"done": "done", "running": "running", "gone": None, "died-listing": "listing", "stuck": "running"}
    started = {"done": now - 10, "running": now - 10, "gone": now - 10, "died-listing": now - 10,
               "stuck": now - STALE_RUN_S - 1}
    shielding, forget = triage_active(states, started, now)  # type: ignore[arg-type]
    assert shielding == ["running"]
    assert sorted(forget) == ["died-listing", "done", "gone", "stuck"]


def test_unfinished_images_are_listed_without_an_outcome() -> None:
    listed = {"a.jpg", "b.jpg", "c.jpg", "d.jpg"}
    assert unfinished_images(listed, {"a.jpg"}, {"b.jpg"}) == {"c.jpg", "d.jpg"}
    assert unfinished_images(listed, listed, set()) == set()


def test_a_run_record_round_trips() -> None:
    run = RunRecord("20261126T150102-1a2b3c4d", 1_764_169_262.5, 1_764_169_263.0, 3, 5, 1, "beat")
    assert RunRecord.from_json(run.to_json()) == run
    assert run.to_dict()["started_at"] == "2025-11-26T15:01:02+00:00"


# (spec timing, a last run, the next run after it): an interval, an hourly cron, a weekday cron run on a Friday.
NEXT_RUNS = [
    ({"every": "1h"}, datetime(2026, 3, 2, 18, 1, 57, 250_000, tzinfo=UTC), datetime(2026, 3, 2, 19, 1, 57, 250_000,
                                                                                    tzinfo=UTC)),
    ({"every": "2s"}, datetime(2026, 3, 2, 18, 1, 57, tzinfo=UTC), datetime(2026, 3, 2, 18, 1, 59, tzinfo=UTC)),
    ({"cron": "0 * * * *"}, datetime(2026, 3, 2, 18, 0, tzinfo=UTC), datetime(2026, 3, 2, 19, 0, tzinfo=UTC)),
    ({"cron": "30 2 * * 1-5"}, datetime(2026, 3, 6, 2, 30, tzinfo=UTC), datetime(2026, 3, 9, 2, 30, tzinfo=UTC)),
]


@pytest.mark.parametrize(("timing", "last_run_at", "expected"), NEXT_RUNS)
def test_the_next_run_stays_put_between_runs(timing: dict[str, str], last_run_at: datetime,
                                              expected: datetime) -> None:
    schedule = _spec(**timing).celery_schedule()
    period = expected - last_run_at
    nows = [last_run_at + period * fraction for fraction in (0, 0.001, 0.1, 0.25, 0.5, 0.9, 0.999)]
    answers = {now: next_run_at(schedule, last_run_at, now) for now in nows}
    assert set(answers.values()) == {expected}, answers
    assert all(answer is not None and answer >= last_run_at + period for answer in answers.values())
    # The same instants in another zone give the same instant.
    plus_two = timezone(timedelta(hours=2))
    assert next_run_at(schedule, last_run_at.astimezone(plus_two), nows[3].astimezone(plus_two)) == expected


@pytest.mark.parametrize(("timing", "last_run_at", "expected"), NEXT_RUNS)
def test_an_overdue_or_never_run_schedule_is_due_now(timing: dict[str, str], last_run_at: datetime,
                                                     expected: datetime) -> None:
    schedule = _spec(**timing).celery_schedule()
    assert next_run_at(schedule, last_run_at, expected) == expected
    late = expected + timedelta(minutes=7)
    assert next_run_at(schedule, last_run_at, late) == late
    assert next_run_at(schedule, None, late) == late


def test_the_next_run_needs_an_aware_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        next_run_at(_spec(every="1h").celery_schedule(), None, datetime(2026, 3, 2, 18, 0))


def test_beat_entries_are_scored_when_they_are_really_due() -> None:
    app = schedules_app(_settings(queue="bs", namespace="unit"))
    entry = BeatEntry(name="hourly", task="t", schedule=_spec(every="1h").celery_schedule(), app=app)
    entry.last_run_at = datetime.now(UTC) - timedelta(minutes=20)
    expected = entry.last_run_at + timedelta(hours=1)
    assert entry.due_at == expected
    assert entry.score == int(expected.timestamp())
