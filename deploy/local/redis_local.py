"""A Redis for the stack and the tests: reuse one that answers, else install and start redis-server."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

from deploy.local.procs import ManagedProcess, stopped_on_failure, tcp_answers

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})
DEFAULT_REDIS_PORT = 6379
START_TIMEOUT_S = 20.0


class RedisUnavailableError(RuntimeError):
    """No Redis answers and we cannot (or may not) start one."""


def redis_answers(url: str) -> bool:
    """Whether a Redis at `url` answers PING (within about a second)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def ensure_redis_server_binary() -> str:
    """The path of `redis-server`, installing the Debian package first when missing and we are root."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RedisUnavailableError(
            "redis-server is not installed; install it (e.g. `sudo apt-get install -y redis-server`) "
            "or point BLOBSCORE_BROKER_URL at a running Redis"
        )
    _apt_install("redis-server")
    found = shutil.which("redis-server")
    if not found:
        raise RedisUnavailableError("apt-get installed redis-server but it is not on PATH")
    return found


def _apt_install(package: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", package]):
        try:
            subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            raise RedisUnavailableError(f"`{' '.join(argv)}` failed:\n{exc.stderr[-2000:]}") from exc


def start_redis(port: int, workdir: Path, appendonly: bool = False) -> ManagedProcess:
    """Start redis-server on 127.0.0.1:`port` with its files and log in `workdir`; return once it answers.

    Without `appendonly` it keeps nothing on disk (tests); with it, queued tasks survive a restart.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        ensure_redis_server_binary(),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(workdir),
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--daemonize", "no",
        "--logfile", "",
    ]  # fmt: skip
    process = ManagedProcess.start(argv, workdir / f"redis-{port}.log", cwd=workdir)
    with stopped_on_failure(process):
        _wait_until_it_answers(process, port)
    return process


def _wait_until_it_answers(process: ManagedProcess, port: int) -> None:
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not redis_answers(url):
        if not process.alive():
            raise RedisUnavailableError(f"redis-server exited on start:\n{process.log_tail()}")
        if time.monotonic() >= deadline:
            raise RedisUnavailableError(f"redis-server did not answer on port {port}:\n{process.log_tail()}")
        time.sleep(0.05)


def ensure_redis(url: str, workdir: Path, *, appendonly: bool = False) -> ManagedProcess | None:
    """Make a Redis answer at `url`: None when one already does, else the redis-server we started for it."""
    if redis_answers(url):
        return None
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or DEFAULT_REDIS_PORT
    if parts.scheme != "redis" or host not in LOCAL_HOSTS:
        raise RedisUnavailableError(
            f"no Redis answers at {_without_password(url)} and it is not a local redis:// URL"
        )
    if tcp_answers("127.0.0.1", port):
        raise RedisUnavailableError(
            f"something listens on 127.0.0.1:{port} but does not answer as Redis at {_without_password(url)} "
            "(a password, another service?)"
        )
    return start_redis(port, workdir, appendonly=appendonly)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()
