"""Per-process adapters (Blob client, gRPC channel, Redis pool): created lazily after fork, shared by threads."""

from __future__ import annotations

import os
import threading

from worker.jobs import JobStore
from worker.models.catalog import get_profile
from worker.pipeline import Dependencies, Limits
from worker.scoring import Scorer
from worker.settings import Settings
from worker.storage import BlobStore


def build_dependencies(settings: Settings) -> Dependencies:
    """Open every adapter one worker process needs."""
    profile = get_profile(settings.scoring_model).with_outputs(tuple(settings.scoring_output_names) or None)
    return Dependencies(
        store=BlobStore.from_settings(settings),
        jobs=JobStore.from_url(settings.jobs_url),
        scorer=Scorer.from_settings(settings, profile),
        profile=profile,
        limits=Limits(settings.max_image_bytes, settings.max_image_pixels, settings.top_k),
    )


def close_dependencies(deps: Dependencies) -> None:
    """Close what build_dependencies opened."""
    deps.store.close()
    deps.jobs.close()
    if isinstance(deps.scorer, Scorer):
        deps.scorer.close()


class ProcessResources:
    """Holds one Dependencies per process: a forked child never reuses its parent's channel or sockets."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._deps: Dependencies | None = None

    def get(self) -> Dependencies:
        """This process's adapters, opened on first use."""
        pid = os.getpid()
        if self._deps is not None and self._pid == pid:
            return self._deps
        with self._lock:
            if self._deps is None or self._pid != pid:
                self._deps = build_dependencies(self._settings)
                self._pid = pid
            return self._deps

    def close(self) -> None:
        """Close this process's adapters, if opened here."""
        with self._lock:
            if self._deps is not None and self._pid == os.getpid():
                close_dependencies(self._deps)
            self._deps = None
