"""One `blobscore` command, composed through entry points: deploy's commands mounted, never imported by producer/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The console script pip installed next to this interpreter (`pip install -e .` registers the entry points).
BLOBSCORE = Path(sys.executable).parent / "blobscore"


def test_blobscore_help_lists_the_commands_deploy_adds() -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("BLOBSCORE_")}
    done = subprocess.run([str(BLOBSCORE), "--help"], env={**env, "COLUMNS": "200", "NO_COLOR": "1"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    rows = (line.strip().strip("\u2502").strip() for line in done.stdout.splitlines())  # inside the box: NAME  HELP
    commands = dict(row.split(None, 1) for row in rows if re.match(r"[a-z]+ {2,}\S", row))
    assert commands.get("stack") == "Run the local stack: Redis, Azurite, the stand-in, a worker.", done.stdout
    assert commands.get("standin") == "The local stand-in scoring service (real CPU model).", done.stdout


def test_producer_never_imports_deploy() -> None:
    pattern = re.compile(r"^\s*(?:import\s+deploy\b|from\s+deploy\b)", re.MULTILINE)
    importing = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "producer").rglob("*.py"))
                 if pattern.search(path.read_text(encoding="utf-8"))]
    assert importing == [], "producer/ imports deploy/: mount a command through the blobscore.commands entry points"
