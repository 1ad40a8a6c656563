"""Start and stop the stand-in scoring server as a real subprocess (`python -m deploy.standin`)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENING_PREFIX = "listening on "


class StandinStartError(RuntimeError):
    """The server did not print its address in time (its log is in the message)."""


@dataclass
class StandinProcess:
    """A running stand-in: its address, its process, and its log file (stderr)."""

    process: subprocess.Popen[str]
    host: str
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        """host:port, as given to grpc channels."""
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        """Everything the server logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, wait for the exit, return the exit code (kill if it does not stop in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


def start_standin(
    args: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = 120.0,
) -> StandinProcess:
    """Run `python -m deploy.standin --port 0 ARGS` and wait until it prints where it listens."""
    full_env = {**os.environ, **(env or {})}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "deploy.standin", "--port", "0", *args],
            cwd=REPO_ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    assert process.stdout is not None
    line = _first_line(process.stdout, startup_timeout_s)
    if not line.startswith(LISTENING_PREFIX):
        process.kill()
        process.wait()
        raise StandinStartError(f"stand-in did not start (stdout {line!r}):\n{log_path.read_text()}")
    host, _, port = line.removeprefix(LISTENING_PREFIX).strip().rpartition(":")
    return StandinProcess(process, host, int(port), log_path)


@contextmanager
def running_standin(
    args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> Iterator[StandinProcess]:
    """A stand-in for the duration of the block, stopped with SIGTERM afterwards."""
    standin = start_standin(args, log_path, env)
    try:
        yield standin
    finally:
        standin.stop()


def _first_line(stream: IO[str], timeout_s: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout_s)
    except queue.Empty:
        return ""


def write_self_signed_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for `host` (IP SAN and localhost) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "standin.crt", directory / "standin.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
