"""Per-process adapters (Blob client, gRPC channel, Redis pool): created lazily after fork, shared by threads."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import redis

from worker.attempts import AttemptCounter
from worker.breaker import CircuitBreaker
from worker.jobs import JobStore
from worker.models.catalog import get_profile
from worker.models.postprocess import PostprocessOptions
from worker.pipeline import Dependencies, Limits
from worker.scoring import Scorer
from worker.settings import Settings
from worker.storage import BlobStore

REDIS_SOCKET_TIMEOUT_S = 10


@dataclass(frozen=True)
class WorkerResources:
    """Everything one worker process shares between its threads."""

    deps: Dependencies
    breaker: CircuitBreaker
    attempts: AttemptCounter
    redis: redis.Redis


def limits_from(settings: Settings) -> Limits:
    """The input limits and postprocessing options of the settings."""
    options = PostprocessOptions(top_k=settings.top_k, detection_threshold=settings.detection_threshold)
    return Limits(settings.max_image_bytes, settings.max_image_pixels, options)


def build_resources(settings: Settings) -> WorkerResources:
    """Open every adapter one worker process needs."""
    profile = get_profile(settings.scoring_model).with_outputs(tuple(settings.scoring_output_names) or None)
    client = redis.Redis.from_url(
        settings.jobs_url, decode_responses=True, health_check_interval=30,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S, socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
    )
    deps = Dependencies(
        store=BlobStore.from_settings(settings),
        jobs=JobStore(client),
        scorer=Scorer.from_settings(settings, profile),
        profile=profile,
        limits=limits_from(settings),
    )
    breaker = CircuitBreaker(
        client, settings.service, threshold=settings.breaker_failure_threshold, open_s=settings.breaker_open_s
    )
    return WorkerResources(deps, breaker, AttemptCounter(client), client)


def close_resources(resources: WorkerResources) -> None:
    """Close what build_resources opened."""
    resources.deps.store.close()
    if isinstance(resources.deps.scorer, Scorer):
        resources.deps.scorer.close()
    resources.redis.close()


class ProcessResources:
    """Holds one WorkerResources per process: a forked child never reuses its parent's channel or sockets."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._resources: WorkerResources | None = None

    def get(self) -> WorkerResources:
        """This process's adapters, opened on first use."""
        resources, pid = self._resources, os.getpid()
        if resources is not None and self._pid == pid:
            return resources
        with self._lock:
            if self._resources is None or self._pid != pid:
                self._resources = build_resources(self._settings)
                self._pid = pid
            return self._resources

    def close(self) -> None:
        """Close this process's adapters, if opened here."""
        with self._lock:
            if self._resources is not None and self._pid == os.getpid():
                close_resources(self._resources)
            self._resources = None
