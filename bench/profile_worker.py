"""Where a worker's CPU per image goes: py-spy on one `python -m worker` at 0 ms scorer latency, plus call counts.

    .venv/bin/pip install py-spy        # bench-only tool, not a blobscore dependency
    .venv/bin/python bench/profile_worker.py [--images 1500] [--inflight 16] [--rate 200] [--out profile.json]
    .venv/bin/python bench/profile_worker.py --corpus photos     # 240 camera-sized photos × 3 rounds

Starts the same private stack as bench/pipeline.py (Azurite with its access log on), uploads a corpus (--corpus
tiny: --images ~3.5 KB crops; photos: bench/photo_corpus.py), prefills the queue with `blobscore enqueue` (--rounds
jobs over the same images, each into its own results prefix), starts one worker (BLOBSCORE_WORKER_CONCURRENCY=
--inflight) with bench/stage_probe.py loaded as its sitecustomize, attaches `py-spy record --format raw --gil
--nonblocking` to it until the jobs are done, and prints one JSON object:

 * worker_cpu_ms_per_image — /proc CPU of the worker from `ready.` to done, divided by the images (py-spy samples
   without pausing the process, so its own cost is small; compare with bench/pipeline.py's figure).
 * cpu_by_thread_ms_per_image — the same CPU split by OS thread (/proc/<pid>/task/*/schedstat): the Celery main
   thread (consumer loop, message handling), the pool threads running tasks (and acking them), and gRPC's C-core
   threads (invisible to py-spy).
 * cpu_by_stage_ms_per_image — the worker's CPU per image by stage: image check, download, score, result upload,
   job counters and the rest of the task from the stage probe (each stage's own thread CPU, GIL-free C work
   included); Celery in the pool threads (their CPU minus the task functions'), the main thread and gRPC's
   threads from /proc; what is left of the /proc total. stage_probe: the probe's figures per stage (calls, CPU ms
   per image and per call, wall ms per call); stage_probe_missing: stages whose function it did not find.
 * sampled_ms_per_image — py-spy samples × period / images: the CPU the GIL-holding thread spent per image (the
   pure-Python share of worker_cpu_ms_per_image; socket syscalls, gRPC's C core and other GIL-free work are not
   in it, nor are the stage probe's wrapper frames). Every percentage below is a share of these samples;
   --all-active samples every thread py-spy deems active instead (it then also counts threads blocked in socket
   reads).
 * by_component_pct — py-spy samples by what the innermost blobscore frame was calling: the
   Blob SDK (azure-core, requests, urllib3, http.client, ssl, socket), gRPC, the Redis client, pydantic, json,
   PIL, numpy, logging, or blobscore's own code; samples with no blobscore frame are Celery/kombu dispatch
   (consumer loop, message decoding, acks, thread-pool hand-off) or other.
 * by_step_pct — the same samples by blobscore function (storage.download, storage.existing_result, ...).
 * top_self_pct — the leaf functions with the most samples; top_inclusive_pct — functions by samples under them.
 * notable_inclusive_pct — named pieces of work (a new BlobClient per call, request signing, the ack, …).
 * http_requests_per_image — Azurite's access log: requests by method and target (source blob, result blob,
   listing), per image; redis_commands_per_image — `INFO commandstats` deltas on the private Redis, per image
   (commands run inside a Lua script count too; hgetall and scard come from this script's status polling).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from pipeline import (
    CORPUS_PREFIX,
    SERVICE,
    SOURCE,
    SYNTH_CONTAINER,
    SYNTH_RESULTS,
    blobscore_env,
    cpu_s,
    listing_in_process,
    r3,
    run_cli,
    start_stack,
    start_workers,
    status_kb,
    upload_images,
    upload_photos,
    wait_until_done,
)

from deploy.local.azurite import connection_string
from deploy.local.procs import ManagedProcess, free_port

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MAIN_THREAD = "main thread (Celery consumer loop)"
POOL_THREADS = "Python threads (task pool, timers)"
OURS = re.compile(re.escape(str(REPO)) + r"/((?:worker|producer)/[\w/]+\.py)")
ENTRY_POINTS = ("worker/__main__.py", "worker/worker_main.py")  # frames under which Celery's own loop runs
# Inclusive shares of named pieces of work (a sample counts if any of its frames matches).
NOTABLE = {
    "Blob SDK: new BlobClient per call (get_blob_client)": r"^BlobServiceClient\.get_blob_client ",
    "Blob SDK: request signing (SharedKeyCredentialPolicy)": r"^SharedKeyCredentialPolicy\.",
    "Blob SDK: response deserialization (Deserializer)": r"^Deserializer\.",
    "Blob SDK: requests Session.request (incl. env/proxy merge)": r"^Session\.request ",
    "Blob SDK: requests merge_environment_settings": r"^Session\.merge_environment_settings ",
    "Blob SDK: urllib3 urlopen (socket I/O, http.client)": r"^HTTPConnectionPool\.urlopen ",
    "Blob SDK: download (BlobClient.download_blob + readall)": r"^BlobStore\.download ",
    "Blob SDK: upload (BlobClient.upload_blob)": r"^BlobStore\.write_result ",
    "gRPC Predict call (Python side)": r"^_UnaryUnaryMultiCallable\.__call__ ",
    "image check (worker.imaging.check_image)": r"^check_image ",
    "postprocess (top-k)": r"^postprocess ",
    "result document (ok_result + to_json)": r"^(ok_result|ResultDoc\.to_json) ",
    "task message validation (ImageTask.from_message)": r"^ImageTask\.from_message ",
    "job counters (JobStore.record_outcome)": r"^JobStore\.record_outcome ",
    "circuit breaker check (Redis)": r"^CircuitBreaker\.check ",
    "Celery: consumer loop, main thread (Hub.create_loop)": r"^Hub\.create_loop ",
    "Celery: message -> Request (task_message_handler)": r"^default\.<locals>\.task_message_handler ",
    "Celery: ack (kombu QoS.ack, new redis client per ack)": r"^QoS\.ack ",
    "kombu: new redis.Redis client (Channel._create_client)": r"^Channel\._create_client ",
    "Celery: tracer around the task (trace_task, task included)": r"^build_tracer\.<locals>\.trace_task ",
    "blobscore task function (score_image, all of the image's work)": r"^register_tasks\.<locals>\.score_image ",
    "logging": r"^Logger\.",
    "producer: listing (BlobStore.list_pages)": r"^BlobStore\.list_pages ",
    "producer: results listing (BlobStore.list_metadata)": r"^BlobStore\.list_metadata ",
    "producer: publishing (TaskPublisher.__call__)": r"^TaskPublisher\.__call__ ",
    "producer: Celery send_task": r"^Celery\.send_task ",
    "producer: ImageTask per image (task_for)": r"^task_for ",
    "producer: job record (JobStore.record_page/advance)": r"^JobStore\.(record_page|advance) ",
}
PACKAGE = re.compile(r"site-packages/([A-Za-z_][\w]*)")
STDLIB = re.compile(r"/lib/python3\.\d+/(?!site-packages)([\w]+)")
COMPONENTS = {
    "azure": "Blob SDK (azure-core/storage)", "requests": "Blob SDK (requests)", "urllib3": "Blob SDK (urllib3)",
    "http": "Blob SDK (http.client)", "ssl": "Blob SDK (socket/ssl)", "socket": "Blob SDK (socket/ssl)",
    "grpc": "gRPC", "redis": "Redis client", "pydantic": "pydantic", "pydantic_core": "pydantic",
    "json": "json", "PIL": "PIL (image check)", "numpy": "numpy", "logging": "logging",
    "celery": "Celery (called from blobscore)", "kombu": "Celery (called from blobscore)",
    "google": "protobuf", "email": "Blob SDK (http.client)", "xml": "Blob SDK (xml)",
}
DISPATCH = {"celery", "kombu", "billiard", "vine", "amqp", "click"}


def frame_module(frame: str) -> tuple[str, str]:
    """('ours', 'worker/storage.py:download') / ('package', name) / ('stdlib', name) / ('other', frame)."""
    name, _, location = frame.rpartition(" (")
    ours = OURS.search(location)
    if ours and ours.group(1) not in ENTRY_POINTS:
        return "ours", f"{ours.group(1)}:{name}"
    package = PACKAGE.search(location)
    if package:
        return "package", package.group(1)
    stdlib = STDLIB.search(location)
    if stdlib:
        return "stdlib", stdlib.group(1)
    return "other", frame


def classify(frames: list[str]) -> tuple[str, str]:
    """(component, step) of one sampled stack, root first."""
    kinds = [frame_module(frame) for frame in frames]
    deepest = max((i for i, (kind, _) in enumerate(kinds) if kind == "ours"), default=None)
    if deepest is None:
        libraries = [name for kind, name in kinds if kind in ("package", "stdlib")]
        if any(name in DISPATCH for name in libraries):
            return "Celery/kombu dispatch (no blobscore frame)", "(no blobscore frame)"
        if "grpc" in libraries:
            return "gRPC (own threads)", "(no blobscore frame)"
        return "other (" + (libraries[-1] if libraries else "native") + ")", "(no blobscore frame)"
    step = kinds[deepest][1]
    below = kinds[deepest + 1:]
    if not below:
        return "blobscore's own code", step
    return COMPONENTS.get(below[0][1], f"other ({below[0][1]})"), step


def read_raw(path: Path) -> list[tuple[list[str], int]]:
    """py-spy raw output: one `frame;frame;... count` line per distinct stack."""
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        body, _, count = line.rpartition(" ")
        if body and count.isdigit():
            # The stage probe's wrappers (sitecustomize.py) are measurement scaffolding, not the worker's work.
            frames = [frame for frame in body.split(";")
                      if not frame.startswith(("process ", "thread ")) and "sitecustomize.py" not in frame]
            stacks.append((frames, int(count)))
    return stacks


def short(frame: str) -> str:
    """`function (path)` with the path cut after site-packages/, lib/python3.X/ or the repository."""
    return re.sub(r"\(\S*?(?:site-packages/|lib/python3\.\d+/|" + re.escape(str(REPO)) + "/)", "(", frame)


def pct(counter: collections.Counter[str], total: int, top: int = 20) -> dict[str, float]:
    """The most common entries as percentages of `total`."""
    return {key: round(100 * value / total, 1) for key, value in counter.most_common(top)}


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Per OS thread of `pid`: (name, CPU seconds).

    From schedstat (nanoseconds on the CPU) where the kernel has it: stat's utime+stime are whole clock ticks
    (10 ms) per thread, and with 16+ pool threads their rounding is ~1 ms per image over a few hundred images.
    """
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = text[text.index("(") + 1 : text.rindex(")")]
        try:
            seconds = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, IndexError, ValueError):
            fields = text.rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        threads[int(task.name)] = (name, seconds)
    return threads


def thread_groups(pid: int, before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                  images: int) -> dict[str, float]:
    """CPU ms per image by thread group: main, Python threads, and named native (gRPC) threads."""
    groups: collections.Counter[str] = collections.Counter()
    for tid, (name, seconds) in after.items():
        spent = seconds - before.get(tid, (name, 0.0))[1]
        if tid == pid:
            group = MAIN_THREAD
        elif name in ("python", "python3") or name.startswith(("python", "Thread")):
            group = POOL_THREADS
        else:
            group = f"native: {re.sub(r'[-_]?[0-9]+$', '', name)}"
        groups[group] += spent
    return {group: round(seconds * 1000 / images, 3) for group, seconds in groups.most_common()}


AZURITE_LINE = re.compile(r'"(GET|HEAD|PUT|POST|DELETE) /[^/\s]+/([^/\s?]+)/?([^\s?]*)(\?\S*)? HTTP')


def azurite_requests(log: Path, offset: int, results_container: str, images: int) -> dict[str, float]:
    """Requests Azurite logged since `offset`, by method and target, per image."""
    counts: collections.Counter[str] = collections.Counter()
    with log.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    for match in AZURITE_LINE.finditer(text):
        method, container, blob, query = match.group(1), match.group(2), match.group(3), match.group(4) or ""
        if "comp=list" in query:
            target = "listing"
        elif not blob:
            target = "container"
        elif container == results_container:
            target = "result blob"
        elif container == SOURCE:
            target = "source blob"
        else:
            target = container
        counts[f"{method} {target}"] += 1
    return {key: round(value / images, 3) for key, value in counts.most_common()}


def redis_commands(client: redis.Redis, images: int) -> dict[str, float]:
    """INFO commandstats calls per image (since CONFIG RESETSTAT)."""
    stats = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    return {name: round(count / images, 3) for name, count in sorted(calls.items(), key=lambda kv: -kv[1])
            if name not in ("info", "config")}


def summarize_samples(raw: Path, rate: int, images: int) -> dict[str, Any]:
    """The sample views (components, steps, notable pieces, leaves, inclusive) of a py-spy raw file."""
    stacks = read_raw(raw)
    total = sum(count for _, count in stacks) or 1
    components: collections.Counter[str] = collections.Counter()
    steps: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    notable: collections.Counter[str] = collections.Counter()
    patterns = {name: re.compile(pattern) for name, pattern in NOTABLE.items()}
    for frames, count in stacks:
        component, step = classify(frames)
        components[component] += count
        steps[step] += count
        if frames:
            leaves[short(frames[-1])] += count
        for frame in {short(frame) for frame in frames}:
            inclusive[frame] += count
        for name, pattern in patterns.items():
            if any(pattern.search(frame) for frame in frames):
                notable[name] += count
    tracer = notable["Celery: tracer around the task (trace_task, task included)"]
    task = notable["blobscore task function (score_image, all of the image's work)"]
    return {
        "py_spy_samples": total, "py_spy_rate": rate,
        # Celery's own work in the pool threads: the tracer minus the task function it runs.
        "celery_pool_thread_overhead_pct": round(100 * (tracer - task) / total, 1),
        # Samples × sampling period / images: the CPU the sampled threads spent, per image.
        "sampled_ms_per_image": r3(total / rate * 1000 / images),
        "by_component_pct": pct(components, total),
        "notable_inclusive_pct": pct(notable, total, len(NOTABLE)),
        "by_step_pct": pct(steps, total),
        "top_self_pct": pct(leaves, total, 25),
        "top_inclusive_pct": pct(inclusive, total, 40),
    }


def install_stage_probe(workdir: Path) -> Path:
    """bench/stage_probe.py as the sitecustomize module of a directory to put on the worker's PYTHONPATH."""
    directory = workdir / "stage-probe"
    directory.mkdir(exist_ok=True)
    shutil.copyfile(BENCH / "stage_probe.py", directory / "sitecustomize.py")
    return directory


def read_stages(prefix: Path) -> tuple[dict[str, dict[str, float]], list[str]]:
    """The stage probe's totals (summed over the worker processes' files) and the stages it could not wrap."""
    stages: dict[str, dict[str, float]] = {}
    missing: set[str] = set()
    for path in prefix.parent.glob(f"{prefix.name}.*"):
        report = json.loads(path.read_text())
        missing.update(report["missing"])
        for name, figures in report["stages"].items():
            entry = stages.setdefault(name, {"calls": 0, "cpu_s": 0.0, "wall_s": 0.0})
            for key in entry:
                entry[key] += figures[key]
    return stages, sorted(missing)


# The stages of the breakdown, from the probe's finer ones (bench/stage_probe.py STAGES).
STAGE_GROUPS = {
    "image check": ("image_check", "shrink"),
    "download (Blob GET)": ("download", "existing_result"),
    "score (Predict: request, gRPC call on the calling thread, response)": ("score_grpc",),
    "result upload (Blob PUT, create-only)": ("result_upload",),
    "job counters (Redis EVALSHA)": ("job_counters",),
}


def stage_breakdown(stages: dict[str, dict[str, float]], threads_ms: dict[str, float], images: int,
                    total_ms: float) -> dict[str, float]:
    """Worker CPU ms per image by stage: the probe's thread CPU per stage, the rest by OS thread (/proc)."""
    def per_image(*names: str) -> float:
        return sum(stages.get(name, {}).get("cpu_s", 0.0) for name in names) * 1000 / images

    task = per_image("task")
    out = {label: per_image(*names) for label, names in STAGE_GROUPS.items()}
    out["other blobscore code in the task (validation, breaker, postprocess, result document)"] = (
        task - sum(out.values()))
    # The pool threads run the task inside Celery's tracer and ack the message after it (acks_late).
    out["Celery in the pool threads (tracer, ack)"] = threads_ms.get(POOL_THREADS, 0.0) - task
    out["Celery main thread (BRPOP, message decode, dispatch to the pool)"] = threads_ms.get(MAIN_THREAD, 0.0)
    out["gRPC C-core threads"] = sum(value for key, value in threads_ms.items() if key.startswith("native"))
    out["unaccounted (/proc total minus the above)"] = total_ms - sum(out.values())
    return {label: r3(value) or 0.0 for label, value in out.items()}


def stage_detail(stages: dict[str, dict[str, float]], images: int) -> dict[str, dict[str, float | None]]:
    """Per probe stage: calls, CPU ms per image and per call, wall ms per call."""
    return {name: {"calls": int(figures["calls"]), "cpu_ms_per_image": r3(figures["cpu_s"] * 1000 / images),
                   "cpu_ms_per_call": r3(figures["cpu_s"] * 1000 / max(figures["calls"], 1)),
                   "wall_ms_per_call": r3(figures["wall_s"] * 1000 / max(figures["calls"], 1))}
            for name, figures in sorted(stages.items(), key=lambda item: -item[1]["cpu_s"])}


def profile_producer(workdir: Path, images: int, rate: int, py_spy: str) -> dict[str, Any]:
    """py-spy on `blobscore enqueue` of `images` generated names from the synthetic listing, queue not consumed."""
    port = free_port()
    logs = workdir / "logs"
    server = ManagedProcess.start([sys.executable, str(Path(__file__).resolve().parent / "pipeline.py"),
                                   "--serve-synthetic-listing", "--listing-port", str(port), "--listing-count",
                                   str(images)], logs / "synthetic-listing.log", cwd=workdir)
    stack = start_stack(workdir, [], 64)
    try:
        server.wait_for_log("listening on", 60)
        env = blobscore_env(stack, 1, "bench-producer", BLOBSCORE_BLOB_CONNECTION_STRING=connection_string(port),
                            BLOBSCORE_ENQUEUE_WINDOW=str(images + 1))
        raw = workdir / "py-spy-producer.txt"
        started = time.perf_counter()
        done = subprocess.run([py_spy, "record", "--rate", str(rate), "--format", "raw", "--full-filenames",
                               "--nolineno", "--gil", "--nonblocking", "--output", str(raw), "--",
                               sys.executable, "-m", "producer.cli", "enqueue", *listing_in_process(),
                               "--container", SYNTH_CONTAINER, "--results-container", SYNTH_RESULTS, "--json"],
                              env=env, cwd=logs, capture_output=True, text=True, timeout=1800, check=False)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"profiled enqueue failed:\n{done.stderr[-3000:]}")
        # py-spy prints its own lines too: the command's JSON is the line that starts with a brace.
        report = next(line for line in done.stdout.splitlines() if line.startswith("{"))
        listed = int(json.loads(report)["listed"])
        return {"producer_images": listed, "producer_wall_s_under_py_spy": r3(wall),
                **summarize_samples(raw, rate, listed)}
    finally:
        stack.stop()
        server.stop()


def parse_args() -> argparse.Namespace:
    """Flags."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--corpus", choices=("tiny", "photos"), default="tiny",
                        help="tiny: ~3.5 KB crops (per-call costs); photos: camera-sized JPEGs (photo_corpus.py).")
    parser.add_argument("--images", type=int, default=None,
                        help="Images scored: tiny crops (default 1500) or photos (default 240, the corpus size).")
    parser.add_argument("--rounds", type=int, default=None,
                        help="Jobs over the same images, each into its own results prefix (default 3 for photos, "
                             "1 for tiny): more tasks, more samples, without a larger corpus.")
    parser.add_argument("--photo-seed", type=int, default=11)
    parser.add_argument("--photo-cache", type=Path, default=None)
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second.")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--all-active", action="store_true",
                        help="Sample every thread py-spy deems active, not only the one holding the GIL.")
    parser.add_argument("--blocking", action="store_true", help="Pause the worker for each sample (exact, slower).")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON object here.")
    parser.add_argument("--producer", type=int, default=0, metavar="N",
                        help="Instead: profile `blobscore enqueue` of N generated names (synthetic listing).")
    args = parser.parse_args()
    args.images = args.images or (240 if args.corpus == "photos" else 1500)
    args.rounds = args.rounds or (3 if args.corpus == "photos" else 1)
    return args


def emit(out: dict[str, Any], path: Path | None) -> None:
    """Print the JSON object (and write it to --out)."""
    print(json.dumps(out, indent=1))
    if path:
        path.write_text(json.dumps(out, indent=1) + "\n")


def upload_corpus(stack: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Upload the chosen corpus; what it is."""
    if args.corpus == "photos":
        return upload_photos(stack, args.images, args.photo_seed, args.photo_cache)
    return upload_images(stack, args.images)


def main() -> None:
    """Run one profiled worker and print the figures."""
    args = parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="blobscore-profile-"))
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if args.producer:
        try:
            emit(profile_producer(workdir, args.producer, args.rate, py_spy), args.out)
        finally:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
        return
    stack = start_stack(workdir, [args.latency_ms], 64, access_log=True)
    try:
        emit(profile_worker(stack, args, py_spy, workdir), args.out)
    finally:
        stack.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def profile_worker(stack: Any, args: argparse.Namespace, py_spy: str, workdir: Path) -> dict[str, Any]:
    """Prefill the queue, run one worker under py-spy and the stage probe until the job is done; the figures."""
    logs = workdir / "logs"
    corpus = upload_corpus(stack, args)
    service = stack.blob_service()
    service.create_container("res-profile")
    service.close()
    _, port = stack.standins[args.latency_ms]
    env = blobscore_env(stack, port, "bench-profile")
    jobs = [run_cli(env, logs, "enqueue", *listing_in_process(), "--container", SOURCE,
                    "--prefix", CORPUS_PREFIX[args.corpus],
                    "--results-container", "res-profile", "--results-prefix", f"profile/{round_}/")[0]
            for round_ in range(args.rounds)]
    images = sum(int(job["listed"]) for job in jobs)
    client = stack.redis()
    client.config_resetstat()
    azurite_log = stack.azurite.log
    offset = azurite_log.stat().st_size
    stage_prefix = logs / "stages"
    worker_env = {**env, "PYTHONPATH": str(install_stage_probe(workdir)), "BLOBSCORE_BENCH_STAGES": str(stage_prefix)}
    (worker,) = start_workers(worker_env, 1, args.inflight, logs, "profile")
    pid = worker.process.pid
    threads_before = thread_cpu(pid)
    raw = workdir / "py-spy.txt"
    spy_flags = [] if args.all_active else ["--gil"]
    spy_flags += [] if args.blocking else ["--nonblocking"]
    spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--format", "raw",
                            "--full-filenames", "--nolineno", "--threads", *spy_flags, "--output", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    final = [wait_until_done(env, job["job_id"], timeout=max(300, images / 3))[2] for job in jobs]
    cpu = cpu_s(pid) - worker.cpu_at_ready
    elapsed = time.time() - (worker.ready_at or time.time())
    threads_after = thread_cpu(pid)
    rss = status_kb(pid, "VmHWM") / 1024
    spy.send_signal(signal.SIGINT)
    spy.wait(timeout=60)
    time.sleep(0.5)  # Azurite writes its access log asynchronously
    worker.process.stop(timeout=20)  # the stage probe writes its totals at shutdown
    threads_ms = thread_groups(pid, threads_before, threads_after, images)
    stages, missing = read_stages(stage_prefix)
    out = {
        "corpus": args.corpus, "images": images, "rounds": args.rounds, "jobs": final, "inflight": args.inflight,
        "scorer_latency_ms": args.latency_ms, "images_per_s": r3(images / elapsed),
        "worker_cpu_ms_per_image": r3(cpu * 1000 / images), "worker_rss_mb": r3(rss),
        "cpu_by_thread_ms_per_image": threads_ms,
        "cpu_by_stage_ms_per_image": stage_breakdown(stages, threads_ms, images, cpu * 1000 / images),
        "stage_probe": stage_detail(stages, images), "stage_probe_missing": missing,
        "py_spy_flags": spy_flags, **summarize_samples(raw, args.rate, images),
        "http_requests_per_image": azurite_requests(azurite_log, offset, "res-profile", images),
        "redis_commands_per_image": redis_commands(client, images),
        "service": SERVICE,
        "corpus_figures": corpus,
    }
    client.close()
    return out


if __name__ == "__main__":
    main()
