"""Azurite, the Blob Storage emulator, for the local stack and the tests: find or install it, start it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from deploy.local.procs import ManagedProcess, ProcessExitedError, stopped_on_failure

AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's documented, public development key: not a secret.
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
PROJECT_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
NPM_INSTALL = ["npm", "install", "--no-save", "--no-package-lock", "--no-audit", "--no-fund"]


class AzuriteUnavailableError(RuntimeError):
    """Azurite is not installed and cannot be installed, or it did not start."""


def connection_string(port: int) -> str:
    """The connection string for an Azurite Blob endpoint on 127.0.0.1:`port` (plain http)."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
    )


def azurite_blob_binary(project_root: Path = PROJECT_ROOT) -> Path:
    """`node_modules/.bin/azurite-blob` under `project_root`, installed from its package.json if missing.

    Started directly rather than through npx, whose wrapper process would own the pid we track.
    """
    binary = project_root / "node_modules" / ".bin" / "azurite-blob"
    if binary.exists() and _installed_version(project_root) == _pinned_version(project_root):
        return binary
    if not (project_root / "package.json").is_file():
        on_path = shutil.which("azurite-blob")
        if on_path:
            return Path(on_path)
        raise AzuriteUnavailableError(f"no package.json in {project_root} to install Azurite from")
    _npm_install(project_root)
    if not binary.exists():
        raise AzuriteUnavailableError(f"npm install in {project_root} did not provide {binary}")
    return binary


def _pinned_version(project_root: Path) -> str | None:
    manifest = json.loads((project_root / "package.json").read_text("utf-8"))
    version: str | None = manifest.get("devDependencies", {}).get("azurite")
    return version


def _installed_version(project_root: Path) -> str | None:
    manifest = project_root / "node_modules" / "azurite" / "package.json"
    try:
        version: str | None = json.loads(manifest.read_text("utf-8")).get("version")
    except (OSError, ValueError):
        return None
    return version


def _npm_install(project_root: Path) -> None:
    if shutil.which("npm") is None:
        raise AzuriteUnavailableError("npm is not installed; install Node.js (with npm) to run Azurite")
    try:
        subprocess.run(NPM_INSTALL, cwd=project_root, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise AzuriteUnavailableError(f"`{' '.join(NPM_INSTALL)}` failed:\n{exc.stderr[-2000:]}") from exc


def start_azurite(
    port: int,
    log: Path,
    location: Path | None = None,
    *,
    access_log: bool = False,
    project_root: Path = PROJECT_ROOT,
) -> ManagedProcess:
    """Start Azurite's Blob service on 127.0.0.1:`port` and return once the port answers.

    Data lives in memory when `location` is None, else in that folder (it survives restarts).
    """
    argv = [
        str(azurite_blob_binary(project_root)),
        "--blobHost", "127.0.0.1",
        "--blobPort", str(port),
        # The current Python SDK sends an API version newer than Azurite knows; it works regardless.
        "--skipApiVersionCheck",
        "--disableTelemetry",
    ]  # fmt: skip
    if location is None:
        argv.append("--inMemoryPersistence")
    else:
        location.mkdir(parents=True, exist_ok=True)
        argv += ["--location", str(location)]
    if not access_log:
        argv.append("--silent")
    process = ManagedProcess.start(argv, log, cwd=location or log.parent)
    with stopped_on_failure(process):
        try:
            process.wait_for_port("127.0.0.1", port, START_TIMEOUT_S, "Azurite")
        except (TimeoutError, ProcessExitedError) as exc:
            raise AzuriteUnavailableError(str(exc)) from exc
    return process
