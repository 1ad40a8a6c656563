"""ManagedProcess and the port helpers, on real child processes."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.procs import (
    ManagedProcess,
    ProcessExitedError,
    free_port,
    port_is_free,
    process_start_ticks,
    stopped_on_failure,
    wait_for_tcp,
)


def _gone(pid: int) -> bool:
    """Dead, or a zombie nobody reaps (orphans here are reparented to an init that may not reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.fixture
def started() -> Iterator[list[ManagedProcess]]:
    """Processes a test starts, killed afterwards whatever happened."""
    processes: list[ManagedProcess] = []
    yield processes
    for process in processes:
        process.kill()


def _start(started: list[ManagedProcess], script: str, log: Path) -> ManagedProcess:
    process = ManagedProcess.start(["sh", "-c", script], log)
    started.append(process)
    return process


def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert port_is_free(port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        assert not port_is_free(port)


def test_wait_for_tcp_returns_once_listening_and_names_the_service_on_timeout() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        wait_for_tcp("127.0.0.1", server.getsockname()[1], timeout=2, what="the thing")

    with pytest.raises(TimeoutError, match=r"the scorer did not answer on 127\.0\.0\.1:\d+ within 0\.3 s"):
        wait_for_tcp("127.0.0.1", free_port(), timeout=0.3, what="the scorer")


def test_output_goes_to_the_log_and_wait_for_log_finds_it(tmp_path: Path, started: list[ManagedProcess]) -> None:
    process = _start(started, "echo listening on 127.0.0.1:4242; echo oops >&2; sleep 30", tmp_path / "p.log")

    match = process.wait_for_log(r"listening on \S+:(\d+)", timeout=5)

    assert match.group(1) == "4242"
    process.wait_for_log("oops", timeout=5)  # stderr lands in the same log
    assert process.alive()


def test_stop_ends_the_whole_group(tmp_path: Path, started: list[ManagedProcess]) -> None:
    process = _start(started, "sleep 300 & echo child $!; wait", tmp_path / "p.log")
    child = int(process.wait_for_log(r"child (\d+)", timeout=5).group(1))

    process.stop(timeout=5)

    assert not process.alive()
    assert _gone(child)


def test_stop_kills_what_ignores_sigterm(tmp_path: Path, started: list[ManagedProcess]) -> None:
    process = _start(started, "trap '' TERM; echo armed; sleep 300", tmp_path / "p.log")
    process.wait_for_log("armed", timeout=5)

    began = time.monotonic()
    process.stop(timeout=0.5)

    assert not process.alive()
    assert time.monotonic() - began < 5


def test_wait_for_log_reports_an_early_exit_with_the_log(tmp_path: Path, started: list[ManagedProcess]) -> None:
    process = _start(started, "echo cannot bind port; exit 3", tmp_path / "p.log")

    with pytest.raises(ProcessExitedError, match="cannot bind port"):
        process.wait_for_log("listening", timeout=10)
    assert process.returncode == 3


def test_wait_for_log_times_out(tmp_path: Path, started: list[ManagedProcess]) -> None:
    process = _start(started, "echo warming up; sleep 30", tmp_path / "p.log")

    with pytest.raises(TimeoutError, match="warming up"):
        process.wait_for_log("listening", timeout=0.3)


def test_wait_for_log_ignores_what_an_earlier_run_logged(tmp_path: Path, started: list[ManagedProcess]) -> None:
    log = tmp_path / "shared.log"
    earlier = _start(started, "echo ready", log)
    earlier.wait_for_log("ready", timeout=5)

    later = _start(started, "sleep 30", log)

    with pytest.raises(TimeoutError):
        later.wait_for_log("ready", timeout=0.3)


def test_attached_handle_sees_and_stops_the_process(tmp_path: Path, started: list[ManagedProcess]) -> None:
    process = _start(started, "sleep 300", tmp_path / "p.log")
    attached = ManagedProcess.attach(process.pid, process.log, process.start_ticks)

    assert attached.alive()
    attached.stop(timeout=5)

    assert not process.alive()
    assert not attached.alive()


def test_a_reused_pid_is_neither_alive_nor_signalled(tmp_path: Path, started: list[ManagedProcess]) -> None:
    process = _start(started, "sleep 300", tmp_path / "p.log")
    ticks = process_start_ticks(process.pid)
    assert ticks is not None
    impostor = ManagedProcess.attach(process.pid, process.log, start_ticks=ticks + 1)

    assert not impostor.alive()
    impostor.stop(timeout=1)
    impostor.kill()

    assert process.alive()


def test_stopped_on_failure_stops_the_process_and_reraises(tmp_path: Path, started: list[ManagedProcess]) -> None:
    process = _start(started, "sleep 300", tmp_path / "p.log")

    with pytest.raises(KeyboardInterrupt), stopped_on_failure(process):
        raise KeyboardInterrupt

    assert not process.alive()


def test_stopped_on_failure_leaves_a_good_start_running(tmp_path: Path, started: list[ManagedProcess]) -> None:
    process = _start(started, "sleep 300", tmp_path / "p.log")

    with stopped_on_failure(process):
        pass

    assert process.alive()
