"""Background processes for the local stack: start, re-attach by pid, wait for readiness, stop the group."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

_POLL_S = 0.05
_TAIL_LINES = 30

# Popen handles of the children we started, by pid. Holding them here keeps a running child's Popen from
# being garbage-collected (which warns "subprocess is still running") and lets a handle re-attached by pid
# in the same interpreter reap the child instead of leaving a zombie.
_OWN_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ProcessExitedError(RuntimeError):
    """A managed process ended while we were waiting for it to become ready."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether we could bind `host:port` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def tcp_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on `host:port`."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_tcp(host: str, port: int, timeout: float, what: str) -> None:
    """Block until `host:port` accepts connections; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not tcp_answers(host, port):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} did not answer on {host}:{port} within {timeout:g} s")
        time.sleep(_POLL_S)


@contextlib.contextmanager
def stopped_on_failure(process: ManagedProcess) -> Iterator[ManagedProcess]:
    """Stop `process` if the block raises anything, Ctrl-C included.

    A half-started service must not linger where no pid file records it.
    """
    try:
        yield process
    except BaseException:
        process.stop()
        raise


def process_start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, /proc/<pid>/stat field 22); None if it does not exist.

    A pid plus its start time names one process for good, so a pid file cannot make us signal an unrelated
    process that later got the same pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after its closing one.
    fields_after_name = stat.rsplit(")", 1)[1].split()
    return int(fields_after_name[19])


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


class ManagedProcess:
    """A command running in its own session (process group) with stdout+stderr appended to a log file.

    Create with `ManagedProcess.start(...)`, or `ManagedProcess.attach(pid, ...)` for one started earlier,
    possibly by another process (the stack's pid files).
    """

    def __init__(self, pid: int, log: Path, start_ticks: int | None, log_offset: int = 0) -> None:
        """Use `start` or `attach` instead."""
        self.pid = pid
        self.log = log
        self.start_ticks = start_ticks
        self._log_offset = log_offset
        self._returncode: int | None = None

    @classmethod
    def start(
        cls,
        argv: Sequence[str],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start `argv` (environment `env`, default ours) in a new session, output appended to `log`."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as sink:
            offset = sink.tell()
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        _OWN_CHILDREN[popen.pid] = popen
        return cls(popen.pid, log, process_start_ticks(popen.pid), offset)

    @classmethod
    def attach(cls, pid: int, log: Path, start_ticks: int | None = None) -> ManagedProcess:
        """A handle on a process started earlier; with `start_ticks`, a reused pid counts as not alive."""
        return cls(pid, log, start_ticks)

    def alive(self) -> bool:
        """Whether the process still runs (a zombie or a different process under the same pid does not)."""
        popen = _OWN_CHILDREN.get(self.pid)
        if popen is not None and self._is_the_recorded_process():
            self._returncode = popen.poll()
            if self._returncode is None:
                return True
            del _OWN_CHILDREN[self.pid]
            return False
        ticks = process_start_ticks(self.pid)
        if ticks is None or _is_zombie(self.pid):
            return False
        return self.start_ticks is None or ticks == self.start_ticks

    def _is_the_recorded_process(self) -> bool:
        ticks = process_start_ticks(self.pid)
        return ticks is None or self.start_ticks is None or ticks == self.start_ticks

    @property
    def returncode(self) -> int | None:
        """The exit status if we started it in this interpreter and it has ended, else None."""
        self.alive()
        return self._returncode

    def stop(self, timeout: float = 10, *, leader_first: bool = False) -> None:
        """SIGTERM the whole group (or, `leader_first`, only its leader, which stops its children itself), wait up
        to `timeout` s for the leader to exit, then SIGKILL the rest."""
        if not self.alive():
            self._signal_group(signal.SIGKILL)  # orphans of a leader that already died
            return
        if leader_first and self._owns_its_group():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        else:
            self._signal_group(signal.SIGTERM)
        self._wait_until_dead(timeout)
        self._signal_group(signal.SIGKILL)
        self._wait_until_dead(timeout)

    def kill(self) -> None:
        """SIGKILL the whole group now."""
        self._signal_group(signal.SIGKILL)
        self._wait_until_dead(5)

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of `pattern` in what the process has logged since it started.

        Raises ProcessExitedError if the process ends first, TimeoutError after `timeout` seconds; both
        quote the end of the log.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self._logged_text())
            if match is not None:
                return match
            if not self.alive():
                match = regex.search(self._logged_text())  # it may have logged just before exiting
                if match is not None:
                    return match
                raise ProcessExitedError(
                    f"process {self.pid} exited before logging /{pattern}/:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"process {self.pid} did not log /{pattern}/ within {timeout:g} s:\n{self.log_tail()}"
                )
            time.sleep(_POLL_S)

    def wait_for_port(self, host: str, port: int, timeout: float, what: str) -> None:
        """Like `wait_for_tcp`, but fail at once (with the log tail) if this process exits meanwhile."""
        deadline = time.monotonic() + timeout
        while not tcp_answers(host, port):
            if not self.alive():
                raise ProcessExitedError(
                    f"{what} exited before answering on {host}:{port}:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{what} did not answer on {host}:{port} within {timeout:g} s:\n{self.log_tail()}"
                )
            time.sleep(_POLL_S)

    def log_tail(self, lines: int = _TAIL_LINES) -> str:
        """The last `lines` lines of the log (for error messages)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log})"
        return "\n".join(text.splitlines()[-lines:])

    def _logged_text(self) -> str:
        try:
            with self.log.open("rb") as handle:
                handle.seek(self._log_offset)
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def _signal_group(self, signum: signal.Signals) -> None:
        # Only signal a group we own: its leader must be our process (same start time) and lead its group.
        if not self._owns_its_group():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def _owns_its_group(self) -> bool:
        if self.pid in _OWN_CHILDREN and self._is_the_recorded_process():
            return True
        ticks = process_start_ticks(self.pid)
        if ticks is None:
            # The leader is gone; group members may remain, and the group id cannot be reused while they do.
            return self._group_exists()
        if self.start_ticks is not None and ticks != self.start_ticks:
            return False
        try:
            return os.getpgid(self.pid) == self.pid
        except ProcessLookupError:
            return False

    def _group_exists(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _wait_until_dead(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(_POLL_S)

    def __repr__(self) -> str:
        return f"ManagedProcess(pid={self.pid}, log={str(self.log)!r})"
