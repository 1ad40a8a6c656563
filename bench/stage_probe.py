"""CPU time of each stage of one image's path, measured on the thread that runs it, inside `python -m worker`.

bench/profile_worker.py copies this file as `sitecustomize.py` into a directory on the worker's PYTHONPATH and sets
BLOBSCORE_BENCH_STAGES to an output path; without that variable importing it does nothing. When the worker starts
(Celery's worker_init), it wraps the worker's own functions listed in STAGES: each call adds its thread's CPU time
(`time.thread_time`, so GIL-free work in C — JPEG decoding, socket reads, protobuf copies — counts, and other
threads' work does not) and its wall time to the stage. Celery's task_prerun/task_postrun signals give the same for
the whole task function, so "the task minus its stages" is the rest of blobscore's code per image. A stage called
inside another stage counts only in the outer one. At shutdown it writes one JSON object:
{"stages": {name: {"calls", "cpu_s", "wall_s"}}, "missing": [stages whose function was not found]}.

py-spy samples only the thread holding the GIL, so it misses exactly the per-byte work large images add; this
probe costs two clock reads per stage call (~1 µs), so it can stay on while py-spy samples.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import inspect
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

# (stage, module, attribute): where the image path looks each function up when it calls it.
STAGES = (
    ("task_validation", "worker.contracts", "ImageTask.from_message"),
    ("breaker_check", "worker.breaker", "CircuitBreaker.check"),
    ("existing_result", "worker.storage", "BlobStore.existing_result"),
    ("download", "worker.storage", "BlobStore.download"),
    ("image_check", "worker.pipeline", "check_image"),
    ("shrink", "worker.pipeline", "shrink_for_model"),
    ("score_grpc", "worker.scoring", "Scorer.predict"),
    ("postprocess", "worker.pipeline", "postprocess"),
    ("result_document", "worker.pipeline", "ok_result"),
    ("result_json", "worker.contracts", "ResultDoc.to_json"),
    ("result_upload", "worker.storage", "BlobStore.write_result"),
    ("job_counters", "worker.jobs", "JobStore.record_outcome"),
)
TASK = "task"  # the whole task function, Celery's prerun to postrun
Add = Callable[[str, float, float], None]

_inside = threading.local()  # per thread: already inside a timed stage (only the outer one counts)


def install(out: str) -> None:
    """Connect to Celery's signals; wrap the stages when the worker starts; write the totals at shutdown."""
    from celery.signals import task_postrun, task_prerun, worker_init, worker_shutdown

    totals: dict[str, list[float]] = {}  # stage: [calls, cpu_s, wall_s]
    lock = threading.Lock()  # pool threads add concurrently; a += on a shared list is not atomic
    missing: list[str] = []
    starts: dict[str, tuple[float, float]] = {}

    def add(stage: str, cpu: float, wall: float) -> None:
        with lock:
            entry = totals.setdefault(stage, [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += cpu
            entry[2] += wall

    def patch(**_: Any) -> None:
        missing.extend(stage for stage, module, attribute in STAGES if not _wrap(stage, module, attribute, add))

    def pre(task_id: str | None = None, **_: Any) -> None:
        starts[str(task_id)] = (time.thread_time(), time.perf_counter())

    def post(task_id: str | None = None, **_: Any) -> None:
        start = starts.pop(str(task_id), None)
        if start is not None:
            add(TASK, time.thread_time() - start[0], time.perf_counter() - start[1])

    def write(**_: Any) -> None:
        with lock:
            stages = {name: {"calls": int(v[0]), "cpu_s": v[1], "wall_s": v[2]} for name, v in totals.items()}
        with open(f"{out}.{os.getpid()}", "w") as sink:
            json.dump({"stages": stages, "missing": missing}, sink)

    worker_init.connect(patch, weak=False)
    task_prerun.connect(pre, weak=False)
    task_postrun.connect(post, weak=False)
    worker_shutdown.connect(write, weak=False)
    atexit.register(write)


def _wrap(stage: str, module: str, attribute: str, add: Add) -> bool:
    """Replace module.attribute (a function, or a method of a class in it) with a timed wrapper; False if absent."""
    try:
        owner: Any = importlib.import_module(module)
        *parents, name = attribute.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        raw = inspect.getattr_static(owner, name)
    except (ImportError, AttributeError):
        return False
    bound = isinstance(raw, classmethod | staticmethod)
    function = raw.__func__ if bound else raw

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        if getattr(_inside, "stage", None):
            return function(*args, **kwargs)
        _inside.stage = stage
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            add(stage, time.thread_time() - cpu, time.perf_counter() - wall)
            _inside.stage = None

    setattr(owner, name, type(raw)(timed) if bound else timed)
    return True


_PATH = os.environ.get("BLOBSCORE_BENCH_STAGES")
if _PATH:
    install(_PATH)
