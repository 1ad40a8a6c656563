"""The producer's rate: listing alone, publishing alone, and list + enqueue, over a synthetic List Blobs endpoint.

    .venv/bin/python bench/producer_rate.py                    # 100,000 names, best of 3 rounds, ~2 minutes
    .venv/bin/python bench/producer_rate.py --images 50000 --rounds 5
    .venv/bin/python bench/producer_rate.py --profile enqueue  # + the top of a cProfile of one enqueue, on stderr

Not a test. It calls the product in-process (BlobStore.from_settings, TaskPublisher, producer.enqueue.enqueue: what
`blobscore enqueue` runs after its start-up), so interpreter start and imports are not in those figures; then it
runs the real command, `python -m producer.cli enqueue`, as bench/pipeline.py does. It measures the code of the tree
it lives in (its parent directory goes first on sys.path and PYTHONPATH). Everything is private and on 127.0.0.1:
a redis-server on a free port (no persistence; flushed between rounds) and, in a child process, a synthetic List
Blobs endpoint that answers every page at once with the properties a storage account returns for a block blob
(pages are built once and cached, so the endpoint costs little CPU on a shared machine).

Keys (per round, the best round reported; cpu from time.process_time(), i.e. this process only, all threads):
 * listing_per_s, listing_cpu_ms_per_1000 — BlobStore.list_pages over every name, pages of --page-size;
 * publish_per_s, publish_cpu_ms_per_1000 — TaskPublisher over ready-made ImageTasks, one call per page;
 * enqueue_per_s, enqueue_cpu_ms_per_1000 — enqueue(): job creation, the results listing, the listing, page
   records and publishing, the window larger than the job (nothing consumes); redis_cpu_ms_per_1000 is what the
   redis-server spent meanwhile;
 * enqueue_cli_per_s, enqueue_cli_cpu_ms_per_1000 — `blobscore enqueue --json --window <more than the job>` as a
   process: images / (its wall time − cli_startup_s), cli_startup_s being the wall time of the same command over an
   empty prefix (`--dry-run`); its CPU (the child's rusage) likewise minus the empty run's.
"""

from __future__ import annotations

import argparse
import cProfile
import http.server
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from deploy.local.azurite import connection_string  # noqa: E402
from deploy.local.procs import ManagedProcess, free_port  # noqa: E402
from deploy.local.redis_local import start_redis  # noqa: E402

CONTAINER = "synth"
RESULTS = "synth-results"
PREFIX = "synthetic/"
SERVICE = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------------------------
# The synthetic endpoint (the same XML as bench/pipeline.py's)


def listing_page(container: str, count: int, prefix: str, marker: str, max_results: int) -> bytes:
    """One List Blobs answer: names `synthetic/0000000.jpg`… from `marker`, as a storage account spells them."""
    start = int(marker) if marker else 0
    if container != CONTAINER or prefix not in ("", PREFIX):
        count = 0  # every other container or prefix is empty
    end = min(count, start + max_results)
    stamp = "Mon, 01 Jan 2024 00:00:00 GMT"
    entries = "".join(
        f"<Blob><Name>{PREFIX}{i:07d}.jpg</Name><Properties><Creation-Time>{stamp}</Creation-Time>"
        f"<Last-Modified>{stamp}</Last-Modified><Etag>0x8DC{i:013X}</Etag><Content-Length>4096</Content-Length>"
        "<Content-Type>image/jpeg</Content-Type><Content-Encoding /><Content-Language /><Content-CRC64 />"
        "<Content-MD5>1B2M2Y8AsgTpgAmY7PhCfg==</Content-MD5><Cache-Control /><Content-Disposition />"
        "<BlobType>BlockBlob</BlobType><AccessTier>Hot</AccessTier><AccessTierInferred>true</AccessTierInferred>"
        "<LeaseStatus>unlocked</LeaseStatus><LeaseState>available</LeaseState>"
        "<ServerEncrypted>true</ServerEncrypted></Properties><Metadata /></Blob>"
        for i in range(start, end)
    )
    next_marker = str(end) if end < count else ""
    return (
        '<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint="http://127.0.0.1/" '
        f'ContainerName="{container}"><Prefix>{prefix}</Prefix><Marker>{marker}</Marker>'
        f"<MaxResults>{max_results}</MaxResults><Blobs>{entries}</Blobs><NextMarker>{next_marker}</NextMarker>"
        "</EnumerationResults>"
    ).encode()


def serve(port: int, count: int) -> None:
    """Answer List Blobs for `count` names in container `synth` until killed."""
    cache: dict[tuple[str, str, str, int], bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            if query.get("comp") != "list":
                self._reply(404, b"", {"x-ms-error-code": "BlobNotFound"})
                return
            key = (url.path.strip("/").split("/")[-1], query.get("prefix", ""), query.get("marker", ""),
                   int(query.get("maxresults", "5000")))
            if key not in cache:
                cache[key] = listing_page(key[0], count, key[1], key[2], key[3])
            self._reply(200, cache[key], {"Content-Type": "application/xml"})

        def _reply(self, code: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(code)
            for name, value in {**headers, "x-ms-version": "2025-01-05", "x-ms-request-id": "bench",
                                "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def proc_cpu_s(pid: int) -> float:
    """utime + stime of process `pid`, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def timed(action: Callable[[], int], redis_pid: int | None = None) -> dict[str, float]:
    """Run `action` (it returns how many images it handled): images, wall seconds, CPU seconds of this process."""
    redis_before = proc_cpu_s(redis_pid) if redis_pid else 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    images = action()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    out = {"images": images, "wall_s": wall, "cpu_s": cpu}
    if redis_pid:
        out["redis_cpu_s"] = proc_cpu_s(redis_pid) - redis_before
    return out


def figures(name: str, runs: list[dict[str, float]]) -> dict[str, Any]:
    """The best round's rate and its CPU per 1,000 images."""
    best = min(runs, key=lambda run: run["wall_s"])
    per_1000 = 1000 / max(best["images"], 1)
    out: dict[str, Any] = {
        f"{name}_per_s": round(best["images"] / best["wall_s"]),
        f"{name}_per_s_rounds": [round(run["images"] / run["wall_s"]) for run in runs],
        f"{name}_cpu_ms_per_1000": round(best["cpu_s"] * 1000 * per_1000, 1),
    }
    if "redis_cpu_s" in best:
        out[f"{name}_redis_cpu_ms_per_1000"] = round(best["redis_cpu_s"] * 1000 * per_1000, 1)
    return out


def profiled(action: Callable[[], int], top: int) -> None:
    """Run `action` under cProfile and print the `top` functions by cumulative and own time to stderr."""
    profile = cProfile.Profile()
    profile.runcall(action)
    for order in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(order).print_stats(top)
        print(text.getvalue(), file=sys.stderr)


class Bench:
    """The product's producer parts on the private endpoint and Redis."""

    def __init__(self, workdir: Path, listing_port: int, redis_port: int, page_size: int) -> None:
        from producer.publishing import TaskPublisher
        from worker.celery_app import create_app
        from worker.jobs import JobSpec, JobStore
        from worker.settings import load_settings
        from worker.storage import BlobStore

        self.broker = f"redis://127.0.0.1:{redis_port}/0"
        self.settings = load_settings(workdir, broker_url=self.broker, queue="bench-rate", service=SERVICE,
                                      blob_connection_string=connection_string(listing_port))
        self.store = BlobStore.from_settings(self.settings)
        self.jobs = JobStore.from_settings(self.settings)
        self.publisher = TaskPublisher(create_app(self.settings), self.settings.queue_for(SERVICE))
        self.spec = JobSpec(CONTAINER, PREFIX, SERVICE, RESULTS, f"blobscore-results/{SERVICE}/")
        self.page_size = page_size

    def flush(self) -> None:
        """Empty the private Redis between rounds."""
        client = redis.Redis.from_url(self.broker)
        client.flushdb()
        client.close()

    def listing(self) -> int:
        """List every synthetic name."""
        return sum(len(page.blobs) for page in self.store.list_pages(CONTAINER, PREFIX, None, self.page_size))

    def publish_only(self, count: int) -> Callable[[], int]:
        """Publish `count` ready-made tasks a page at a time."""
        from producer.enqueue import task_for
        from worker.storage import ListedBlob

        blobs = [ListedBlob(f"{PREFIX}{i:07d}.jpg", f"0x8DC{i:013X}", 4096, "image/jpeg") for i in range(count)]
        tasks = [task_for("bench-job", i, self.spec, blob, self.settings.deployment) for i, blob in enumerate(blobs)]

        def run() -> int:
            for start in range(0, count, self.page_size):
                self.publisher(tasks[start:start + self.page_size])
            return count

        return run

    def enqueue(self) -> int:
        """The enqueue command's work after start-up; the window never blocks."""
        from producer.enqueue import EnqueueOptions, enqueue

        options = EnqueueOptions(window=10**9, page_size=self.page_size)
        return enqueue(self.store, self.jobs, self.publisher, self.spec, self.settings.deployment, options).listed


class Cli:
    """The `blobscore enqueue` command as a process, configured by environment like bench/pipeline.py's."""

    def __init__(self, workdir: Path, listing_port: int, redis_port: int) -> None:
        clean = {key: value for key, value in os.environ.items() if not key.startswith("BLOBSCORE_")}
        self.workdir = workdir
        self.env = {**clean, "PYTHONPATH": str(REPO), "BLOBSCORE_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
                    "BLOBSCORE_QUEUE": "bench-cli", "BLOBSCORE_SERVICE": SERVICE,
                    "BLOBSCORE_BLOB_CONNECTION_STRING": connection_string(listing_port)}

    def enqueue(self, prefix: str, *extra: str) -> dict[str, float]:
        """Run the command once: images it listed, wall and CPU seconds."""
        argv = [sys.executable, "-m", "producer.cli", "enqueue", "--container", CONTAINER, "--prefix", prefix,
                "--results-container", RESULTS, "--window", str(10**9), "--json", *extra]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(argv, env=self.env, cwd=self.workdir, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"blobscore enqueue failed ({done.returncode}):\n{done.stderr[-3000:]}")
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return {"images": int(json.loads(done.stdout.strip().splitlines()[-1])["listed"]), "wall_s": wall,
                "cpu_s": cpu}


def cli_figures(cli: Cli, bench: Bench, rounds: int) -> dict[str, Any]:
    """The command's rate and CPU with its start-up (an empty run, the best of `rounds`) taken off."""
    empty = min((cli.enqueue("nothing/", "--dry-run") for _ in range(rounds)), key=lambda run: run["wall_s"])
    runs = []
    for _ in range(rounds):
        bench.flush()
        run = cli.enqueue(PREFIX)
        runs.append({"images": run["images"], "wall_s": run["wall_s"] - empty["wall_s"],
                     "cpu_s": run["cpu_s"] - empty["cpu_s"]})
    return {"cli_startup_s": round(empty["wall_s"], 2), **figures("enqueue_cli", runs)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the endpoint and Redis, measure each part `args.rounds` times, stop both."""
    with tempfile.TemporaryDirectory(prefix="producer-rate-") as tmp:
        workdir = Path(tmp)
        listing_port, redis_port = free_port(), free_port()
        endpoint = ManagedProcess.start(
            [sys.executable, str(Path(__file__).resolve()), "--serve", str(listing_port), "--images",
             str(args.images)], workdir / "endpoint.log", cwd=workdir)
        redis_server = start_redis(redis_port, workdir / "redis")
        try:
            endpoint.wait_for_log("listening on", 30)
            bench = Bench(workdir, listing_port, redis_port, args.page_size)
            out = measure(bench, args, redis_server.pid)
            if not args.skip_cli:
                out.update(cli_figures(Cli(workdir, listing_port, redis_port), bench, args.rounds))
                bench.flush()
            return out
        finally:
            endpoint.stop()
            redis_server.stop()


def measure(bench: Bench, args: argparse.Namespace, redis_pid: int) -> dict[str, Any]:
    """Every figure, best of `args.rounds`."""
    bench.listing()  # warms the endpoint's page cache and the HTTP connection
    out: dict[str, Any] = {"images": args.images, "page_size": args.page_size, "rounds": args.rounds,
                           "load_avg_1m": round(os.getloadavg()[0], 2)}
    out.update(figures("listing", [timed(bench.listing) for _ in range(args.rounds)]))
    publish = bench.publish_only(args.images)
    runs = []
    for _ in range(args.rounds):
        bench.flush()
        runs.append(timed(publish, redis_pid))
    out.update(figures("publish", runs))
    runs = []
    for _ in range(args.rounds):
        bench.flush()
        runs.append(timed(bench.enqueue, redis_pid))
    out.update(figures("enqueue", runs))
    if args.profile:
        bench.flush()
        profiled(bench.listing if args.profile == "listing" else bench.enqueue, args.top)
    bench.flush()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000, help="synthetic names (default 100,000)")
    parser.add_argument("--page-size", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", choices=["listing", "enqueue"], help="print a cProfile of one more run")
    parser.add_argument("--top", type=int, default=30, help="functions per cProfile table")
    parser.add_argument("--skip-cli", action="store_true", help="leave out the `blobscore enqueue` process runs")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.images)
        return
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
