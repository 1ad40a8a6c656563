"""Keep N copies of a command running for the local stack: restart any that exits, count restarts in a state file.

`blobscore stack up` runs its workers under this, as Kubernetes or systemd would in production: a worker that
exits (a kill, a crash) is started again within a second, with a growing pause if it keeps exiting at once (a
wrong key stops a worker at start-up: restarting it in a tight loop would only fill the log). TERM or INT stops
the children (a warm shutdown each) and then this process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

POLL_S = 0.5
# A child that lived shorter than this counts as a failed start: the pause before the next one doubles.
QUICK_EXIT_S = 10.0
MAX_PAUSE_S = 30.0
STOP_TIMEOUT_S = 30.0


class Supervisor:
    """The children, their restarts, and the state file `blobscore stack status` reads."""

    def __init__(self, argv: list[str], count: int, state_file: Path) -> None:
        self._argv = argv
        self._state_file = state_file
        self._children: list[subprocess.Popen[bytes] | None] = [None] * count
        self._started_at = [0.0] * count
        self._not_before = [0.0] * count
        self._pause = [1.0] * count
        self._restarts = 0
        self._exits: list[dict[str, Any]] = []
        self.stopping = False

    def run(self) -> int:
        """Supervise until told to stop; then stop the children and return 0."""
        for slot in range(len(self._children)):
            self._start(slot)
        while not self.stopping:
            for slot, child in enumerate(self._children):
                if child is None:
                    if time.monotonic() >= self._not_before[slot]:
                        self._start(slot)
                elif child.poll() is not None:
                    self._exited(slot, child)
            self._save()
            time.sleep(POLL_S)
        self._stop_children()
        return 0

    def _start(self, slot: int) -> None:
        # Children stay in our process group: `stack down` and a kill of the group reach them too.
        self._children[slot] = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL)
        self._started_at[slot] = time.monotonic()

    def _exited(self, slot: int, child: subprocess.Popen[bytes]) -> None:
        lived = time.monotonic() - self._started_at[slot]
        self._restarts += 1
        self._exits = [*self._exits[-9:], {"pid": child.pid, "code": child.returncode, "lived_s": round(lived, 1),
                                           "at": time.time()}]
        self._pause[slot] = min(self._pause[slot] * 2, MAX_PAUSE_S) if lived < QUICK_EXIT_S else 1.0
        pause = self._pause[slot] if lived < QUICK_EXIT_S else 0.0
        print(f"supervise: worker {child.pid} exited with {child.returncode} after {lived:.1f} s; "
              f"restarting in {pause:.0f} s", file=sys.stderr, flush=True)
        self._children[slot] = None
        self._not_before[slot] = time.monotonic() + pause

    def _stop_children(self) -> None:
        running = [child for child in self._children if child is not None and child.poll() is None]
        for child in running:
            child.send_signal(signal.SIGTERM)  # a warm shutdown: running images finish
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in running:
            try:
                child.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.kill()
        self._save()

    def _save(self) -> None:
        state = {"supervisor": os.getpid(), "restarts": self._restarts, "recent_exits": self._exits,
                 "children": [child.pid for child in self._children if child is not None and child.poll() is None]}
        temporary = self._state_file.with_name(f".{self._state_file.name}.tmp")
        temporary.write_text(json.dumps(state), "utf-8")
        os.replace(temporary, self._state_file)


def read_state(state_file: Path) -> dict[str, Any]:
    """The supervisor's last saved state (empty when it never ran here)."""
    try:
        state: dict[str, Any] = json.loads(state_file.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return state


def main(argv: list[str] | None = None) -> int:
    """`python -m deploy.local.supervise --count N --state FILE -- COMMAND...`"""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = [part for part in args.command if part != "--"] or [sys.executable, "-m", "worker"]
    supervisor = Supervisor(command, max(args.count, 1), args.state)

    def stop(*_: Any) -> None:
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return supervisor.run()


if __name__ == "__main__":
    raise SystemExit(main())
