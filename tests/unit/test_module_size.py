"""The README's promise about the code: every module of worker/ and producer/ says its job in its first docstring
line and stays under 350 lines (generated protobuf code aside)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 350
MODULES = sorted(path for package in ("worker", "producer") for path in (ROOT / package).rglob("*.py")
                 if "protos" not in path.parts)


@pytest.mark.parametrize("path", MODULES, ids=[str(path.relative_to(ROOT)) for path in MODULES])
def test_a_module_has_one_stated_job_and_stays_small(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= MAX_LINES, f"{path.name} is over {MAX_LINES} lines: split it by job"
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring, f"{path.name} has no module docstring saying its job"
    assert docstring.splitlines()[0].strip(), f"{path.name}'s docstring does not start with its job"


def test_the_modules_are_found() -> None:
    assert len(MODULES) > 40
