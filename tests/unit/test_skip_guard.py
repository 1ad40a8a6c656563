"""The guard in tests/conftest.py: a skipped integration test fails the run; other skips do not."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

GUARD = Path(__file__).parents[1] / "conftest.py"
INI = "[pytest]\naddopts = --strict-markers -p no:cacheprovider\nmarkers =\n    integration: needs services\n"


def _run_suite(root: Path, files: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (root / "pytest.ini").write_text(INI)
    shutil.copy(GUARD, root / "conftest.py")
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(root)], cwd=root, capture_output=True, text=True, timeout=60, check=False
    )


SKIPPED_INTEGRATION = """
import pytest

@pytest.mark.integration
def test_needs_redis():
    pytest.skip("no Redis")
"""

PLAIN_SKIP = """
import pytest

def test_optional():
    pytest.skip("not today")

def test_passes():
    assert True
"""

IMPORTORSKIP_MODULE = """
import pytest
pytest.importorskip("a_module_that_is_not_installed")

def test_never_runs():
    assert True
"""


def test_a_skipped_integration_test_fails_the_run(tmp_path: Path) -> None:
    result = _run_suite(tmp_path, {"integration/test_svc.py": SKIPPED_INTEGRATION, "test_plain.py": PLAIN_SKIP})

    assert result.returncode == 1, result.stdout
    assert "integration tests must not be skipped" in result.stdout
    assert "test_svc.py::test_needs_redis" in result.stdout


def test_an_integration_module_skipped_at_import_fails_the_run(tmp_path: Path) -> None:
    result = _run_suite(tmp_path, {"integration/test_svc.py": IMPORTORSKIP_MODULE})

    assert result.returncode == 1, result.stdout
    assert "integration tests must not be skipped" in result.stdout


def test_other_skips_are_fine(tmp_path: Path) -> None:
    result = _run_suite(tmp_path, {"test_plain.py": PLAIN_SKIP})

    assert result.returncode == 0, result.stdout
    assert "must not be skipped" not in result.stdout
