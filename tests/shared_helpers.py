"""Helpers shared by the integration and fault suites: the real CLI as a subprocess, small real JPEGs and containers
of them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from azure.storage.blob import BlobServiceClient
from PIL import Image

from worker.settings import Settings


def settings_of(env: dict[str, str]) -> Settings:
    """The Settings a process started with `env` builds from its BLOBSCORE_* variables (for queue names and keys)."""
    fields = {name.removeprefix("BLOBSCORE_").lower(): value for name, value in env.items()
              if name.startswith("BLOBSCORE_") and name.removeprefix("BLOBSCORE_").lower() in Settings.model_fields}
    return Settings.model_validate(fields)  # the given variables only, not this process's environment


def run_cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    """Run `blobscore ARGS` as a subprocess and return its standard output (fails the test on non-zero exit)."""
    completed = subprocess.run(
        [sys.executable, "-m", "producer.cli", *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert completed.returncode == 0, f"blobscore {' '.join(args)} failed:\n{completed.stderr}"
    return completed.stdout


def run_cli_json(env: dict[str, str], cwd: Path, *args: str) -> dict[str, Any]:
    """Run a `--json` command and parse its one JSON object."""
    parsed: dict[str, Any] = json.loads(run_cli(env, cwd, *args, "--json"))
    return parsed


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (64, 48), **save: Any) -> bytes:
    """A small valid JPEG of random pixels (distinct seeds give distinct bytes, so distinct scorer hashes)."""
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def container_of_jpegs(service: BlobServiceClient, stem: str, count: int, size: tuple[int, int]) -> str:
    """A new container `<stem>-<random>` holding `count` distinct JPEGs img-000.jpg, img-001.jpg, …; its name."""
    name = f"{stem}-{uuid.uuid4().hex[:12]}"
    container = service.create_container(name)
    for number in range(count):
        container.upload_blob(f"img-{number:03d}.jpg", jpeg_bytes(number, size))
    return name
