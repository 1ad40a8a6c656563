"""Where a worker's CPU per image goes: py-spy on one `python -m worker` at 0 ms scorer latency, plus call counts.

    .venv/bin/pip install py-spy        # bench-only tool, not a blobscore dependency
    .venv/bin/python bench/profile_worker.py [--images 1500] [--inflight 16] [--rate 200] [--out profile.json]

Starts the same private stack as bench/pipeline.py (Azurite with its access log on), prefills the queue with
`blobscore enqueue`, starts one worker (BLOBSCORE_WORKER_CONCURRENCY=--inflight), attaches `py-spy record --format
raw --gil --nonblocking` to it until the job is done, and prints one JSON object:

 * worker_cpu_ms_per_image — /proc CPU of the worker from `ready.` to done, divided by the images (py-spy samples
   without pausing the process, so its own cost is small; compare with bench/pipeline.py's figure).
 * cpu_by_thread_ms_per_image — the same CPU split by OS thread (/proc/<pid>/task): the Celery main thread (consumer
   loop, message handling, acks), the pool threads running tasks, and gRPC's C-core threads (invisible to py-spy).
 * sampled_ms_per_image — py-spy samples × period / images: the CPU the GIL-holding thread spent per image (the
   pure-Python share of worker_cpu_ms_per_image; socket syscalls, gRPC's C core and other GIL-free work are not
   in it). Every percentage below is a share of these samples; --all-active samples every thread py-spy deems
   active instead (it then also counts threads blocked in socket reads).
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
    SERVICE,
    SOURCE,
    SYNTH_CONTAINER,
    SYNTH_RESULTS,
    blobscore_env,
    cpu_s,
    r3,
    run_cli,
    start_stack,
    start_workers,
    status_kb,
    upload_images,
    wait_until_done,
)

from deploy.local.azurite import connection_string
from deploy.local.procs import ManagedProcess, free_port

REPO = Path(__file__).resolve().parent.parent
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
            frames = [frame for frame in body.split(";") if not frame.startswith(("process ", "thread "))]
            stacks.append((frames, int(count)))
    return stacks


def short(frame: str) -> str:
    """`function (path)` with the path cut after site-packages/, lib/python3.X/ or the repository."""
    return re.sub(r"\(\S*?(?:site-packages/|lib/python3\.\d+/|" + re.escape(str(REPO)) + "/)", "(", frame)


def pct(counter: collections.Counter[str], total: int, top: int = 20) -> dict[str, float]:
    """The most common entries as percentages of `total`."""
    return {key: round(100 * value / total, 1) for key, value in counter.most_common(top)}


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Per OS thread of `pid`: (name, CPU seconds)."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        threads[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return threads


def thread_groups(pid: int, before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                  images: int) -> dict[str, float]:
    """CPU ms per image by thread group: main, Python threads, and named native (gRPC) threads."""
    groups: collections.Counter[str] = collections.Counter()
    for tid, (name, seconds) in after.items():
        spent = seconds - before.get(tid, (name, 0.0))[1]
        if tid == pid:
            group = "main thread (Celery consumer loop)"
        elif name in ("python", "python3") or name.startswith(("python", "Thread")):
            group = "Python threads (task pool, timers)"
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
                               sys.executable, "-m", "producer.cli", "enqueue", "--container", SYNTH_CONTAINER,
                               "--results-container", SYNTH_RESULTS, "--json"],
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


def main() -> None:
    """Run one profiled worker and print the figures."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--images", type=int, default=1500)
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
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="blobscore-profile-"))
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if args.producer:
        try:
            out = profile_producer(workdir, args.producer, args.rate, py_spy)
            print(json.dumps(out, indent=1))
            if args.out:
                args.out.write_text(json.dumps(out, indent=1) + "\n")
        finally:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
        return
    stack = start_stack(workdir, [args.latency_ms], 64, access_log=True)
    try:
        upload_images(stack, args.images)
        service = stack.blob_service()
        service.create_container("res-profile")
        service.close()
        _, port = stack.standins[args.latency_ms]
        env = blobscore_env(stack, port, "bench-profile")
        enqueued, _ = run_cli(env, logs, "enqueue", "--container", SOURCE, "--prefix", "img/", "--results-container",
                              "res-profile", "--results-prefix", "profile/")
        images = int(enqueued["listed"])
        client = stack.redis()
        client.config_resetstat()
        azurite_log = stack.azurite.log
        offset = azurite_log.stat().st_size
        (worker,) = start_workers(env, 1, args.inflight, logs, "profile")
        pid = worker.process.pid
        threads_before = thread_cpu(pid)
        raw = workdir / "py-spy.txt"
        spy_flags = [] if args.all_active else ["--gil"]
        spy_flags += [] if args.blocking else ["--nonblocking"]
        spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--format", "raw",
                                "--full-filenames", "--nolineno", "--threads", *spy_flags, "--output", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, _, final = wait_until_done(stack.redis_url, enqueued["job_id"], timeout=max(300, images / 3))
        cpu = cpu_s(pid) - worker.cpu_at_ready
        elapsed = time.time() - (worker.ready_at or time.time())
        threads_after = thread_cpu(pid)
        rss = status_kb(pid, "VmHWM") / 1024
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
        time.sleep(0.5)  # Azurite writes its access log asynchronously
        worker.process.stop(timeout=20)
        print(json.dumps(out := {
            "images": images, "job": final, "inflight": args.inflight, "scorer_latency_ms": args.latency_ms,
            "images_per_s": r3(images / elapsed), "worker_cpu_ms_per_image": r3(cpu * 1000 / images),
            "worker_rss_mb": r3(rss),
            "cpu_by_thread_ms_per_image": thread_groups(pid, threads_before, threads_after, images),
            "py_spy_flags": spy_flags, **summarize_samples(raw, args.rate, images),
            "http_requests_per_image": azurite_requests(azurite_log, offset, "res-profile", images),
            "redis_commands_per_image": redis_commands(client, images),
            "service": SERVICE,
        }, indent=1))
        if args.out:
            args.out.write_text(json.dumps(out, indent=1) + "\n")
        client.close()
    finally:
        stack.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
