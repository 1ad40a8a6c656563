"""Per-process adapters (Blob client, gRPC channels, Redis pool): created lazily after fork, shared by threads."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import redis

from worker.attempts import AttemptCounter
from worker.breaker import CircuitBreaker
from worker.jobs import JobStore
from worker.models.postprocess import PostprocessOptions
from worker.pipeline import Dependencies, Limits
from worker.redis_client import open_redis
from worker.retry import RetryPolicy
from worker.scoring import Scorer
from worker.settings import Settings
from worker.storage import BlobStore


def limits_from(settings: Settings) -> Limits:
    """The input limits and postprocessing options of the settings."""
    options = PostprocessOptions(top_k=settings.top_k, detection_threshold=settings.detection_threshold)
    return Limits(settings.max_image_bytes, settings.max_image_pixels, options, settings.shrink_short_side,
                  full_decode=settings.image_check == "decode")


def policy_from(settings: Settings) -> RetryPolicy:
    """The retry policy's numbers from the settings."""
    return RetryPolicy(settings.max_transient_retries, settings.retry_backoff_max_s, settings.max_crash_attempts)


@dataclass(frozen=True)
class ServiceResources:
    """What scoring for one service needs: the pipeline's dependencies and the service's circuit breaker."""

    deps: Dependencies
    breaker: CircuitBreaker


@dataclass
class WorkerResources:
    """Everything one worker process shares between its threads; one channel per service, opened on first use."""

    settings: Settings
    store: BlobStore
    jobs: JobStore
    attempts: AttemptCounter
    redis: redis.Redis
    _services: dict[str, ServiceResources] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def policy(self) -> RetryPolicy:
        """The retry policy of these settings."""
        return policy_from(self.settings)

    def for_service(self, name: str) -> ServiceResources:
        """The scorer and breaker of service `name` (ConfigurationError for a service this worker does not know)."""
        found = self._services.get(name)
        if found is not None:
            return found
        with self._lock:
            if name not in self._services:
                self._services[name] = self._open_service(name)
            return self._services[name]

    def _open_service(self, name: str) -> ServiceResources:
        settings = self.settings
        scorer = Scorer.for_service(settings.service_config(name), settings)
        deps = Dependencies(self.store, self.jobs, scorer, scorer.profile, limits_from(settings))
        breaker = CircuitBreaker(
            self.redis, name, key_prefix=settings.key_prefix, threshold=settings.breaker_failure_threshold,
            open_s=settings.breaker_open_s,
        )
        return ServiceResources(deps, breaker)

    def close(self) -> None:
        """Close every channel, the Blob client and the Redis pool."""
        for service in self._services.values():
            if isinstance(service.deps.scorer, Scorer):
                service.deps.scorer.close()
        self.store.close()
        self.redis.close()


def build_resources(settings: Settings) -> WorkerResources:
    """Open the process-wide adapters; scoring channels open per service on first use."""
    client = open_redis(settings.jobs_url)
    store = BlobStore.from_settings(settings)
    prefix = settings.key_prefix
    return WorkerResources(settings, store, JobStore(client, prefix), AttemptCounter(client, prefix), client)


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
                self._resources.close()
            self._resources = None
