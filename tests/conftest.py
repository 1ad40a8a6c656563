"""Suite-wide guard: a skipped integration test fails the session, so CI cannot pass without the services."""

from __future__ import annotations

from pathlib import Path

import pytest

INTEGRATION_MARK = "integration"
INTEGRATION_DIR = Path(__file__).parent / "integration"
# Node ids of skipped integration tests in this session (the report hooks get no config to stash them on).
_skipped_integration: list[str] = []


def pytest_configure() -> None:
    _skipped_integration.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # An expected failure (xfail) also reports as skipped; it is not a missing service.
    if report.skipped and INTEGRATION_MARK in report.keywords and not hasattr(report, "wasxfail"):
        _record(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # A whole integration module skipped at import (pytest.importorskip, a module-level skip).
    if report.skipped and _is_under(report.fspath, INTEGRATION_DIR):
        _record(report.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _skipped_integration:
        terminalreporter.write_sep("=", "integration tests must not be skipped", red=True, bold=True)
        for nodeid in _skipped_integration:
            terminalreporter.write_line(f"SKIPPED integration test (counts as a failure): {nodeid}", red=True)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _skipped_integration and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _record(nodeid: str) -> None:
    _skipped_integration.append(nodeid)


def _is_under(path: str, directory: Path) -> bool:
    return Path(path).resolve().is_relative_to(directory.resolve())
