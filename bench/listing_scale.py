"""The listing carrier at scale: 10k, 100k and 1M source names, with every result current, 1 in 1000 stale, none.

    .venv/bin/python bench/listing_scale.py                          # 10k, 100k, 1M × 3 runs (+ old at 100k), ~7 min
    .venv/bin/python bench/listing_scale.py --sizes 10000 100000     # quicker
    .venv/bin/python bench/listing_scale.py --sizes 1000000 --runs with --old-at --profile   # + cProfile, stderr

Not a test. Everything is private and on 127.0.0.1: a redis-server on a free port (no persistence, flushed between
runs) and, in a child process, a synthetic List Blobs endpoint the real azure-storage-blob SDK talks to (the XML a
storage account sends). The endpoint makes every page on the fly from its marker (no list of names in its memory):

 * container `with-<N>` / `stale-<N>` / `none-<N>`, prefix `img/`: N block blobs `img/0000000.jpg`… in name order, etag
   `0x8DC<i, 13 hex digits>`, paged by `maxresults` / `marker`;
 * same container, prefix `blobscore-results/local/` (the default results place: results container = source
   container, service `local`): in `with-<N>`, one result blob `blobscore-results/local/img/0000000.jpg.json` per
   source, and with `include=metadata` the `<Metadata>` a result carries (`blobscore_source_etag` = the source's
   etag, so every one is current and skipped, `blobscore_status` ok, `blobscore_job` j); `stale-<N>` the same
   except that every 1,000th result (source 0 included) carries an older etag, so those sources are queued again —
   the time to the first queued task with N existing results; in `none-<N>` nothing.

Each run is a separate process (its RSS is its own; the endpoint and Redis run elsewhere): it imports the product,
opens what a worker's carrier opens (`BlobStore.from_settings`, a `JobStore`, a `TaskPublisher` on a publishing
Celery app), creates the job as `blobscore enqueue` does (window 10M so no step waits; page size 5,000; no limit),
moves the listing generation on as `start_listing` does (without queueing the step message: this process is the
"fleet"), then calls `producer.carrier.list_step` in a loop — generation read from the job record, `next_step` a
no-op that records the generation asked for — until the step says `done`. Image tasks go to the private Redis
through the real `TaskPublisher` (wrapped to count them and to time the first one).

`--old-at N…` also runs, on `stale-<N>`, what the producer did before the carrier: list the whole results
prefix into one dict (`producer.listing.current_results` over `BlobStore.list_metadata`) before the first page of
sources, then the page loop of the old `run_listing` (record page, publish, advance) with the dict.

Keys per run (`runs[]`): `first_page_s` (job creation → first step returned), `first_task_s` (→ first
`TaskPublisher` call returned: tasks are in Redis), `listing_s` (→ the step that said done), `names_per_s` (source
names / listing_s), `steps`, `queued`, `skipped_current`, `rss_mb_ready` (VmRSS after imports and connections,
before the job), `rss_mb_peak` (VmHWM at the end, from /proc/self/status), `rss_mb_sampled_max` (this process
polling the carrier's VmRSS every 50 ms), `rss_mb_by_step` (VmRSS after the first step and at 25/50/75/100 % of
the steps), `carrier_cpu_s` (its rusage), `endpoint_cpu_s` and `redis_cpu_s` over the run, `redis_job_mb` (the
job's own keys by MEMORY USAGE: record, pages, lock), `redis_queue_mb` (the queued task messages: used_memory
after − before − the job's keys; `queue_messages` their number), `redis_peak_mb` (peak used_memory − before, sampled
every 200 ms), `results_cursor_bytes_max` (the packed results cursor kept in the job record),
`cursor_ahead_after_first_step` (how many results that cursor carries to the next step).
`startup_s`: carrier process launch → ready (interpreter, imports, connections), not in the other times.
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
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from deploy.local.azurite import connection_string  # noqa: E402
from deploy.local.procs import ManagedProcess, free_port  # noqa: E402
from deploy.local.redis_local import start_redis  # noqa: E402

SOURCE_PREFIX = "img/"
SERVICE = "local"
RESULTS_PREFIX = f"blobscore-results/{SERVICE}/"
QUEUE = "bench-scale"
CLK_TCK = os.sysconf("SC_CLK_TCK")
STAMP = "Mon, 01 Jan 2024 00:00:00 GMT"
KINDS = ("with", "stale", "none")
RESULTS_LABEL = {"with": "all current", "stale": "all, 1 in 1000 stale", "none": "none"}
STALE_EVERY = 1000  # in `stale-N`, the result of every 1000th source (the first included) describes an older version

# ---------------------------------------------------------------------------------------------------------------
# The synthetic endpoint: pages made on the fly from the marker (an index), nothing kept between requests


def etag_of(i: int) -> str:
    """The source blob i's etag (as a listing spells it: unquoted)."""
    return f"0x8DC{i:013X}"


def _source_entry(i: int, metadata: bool) -> str:
    return (
        f"<Blob><Name>{SOURCE_PREFIX}{i:07d}.jpg</Name><Properties><Creation-Time>{STAMP}</Creation-Time>"
        f"<Last-Modified>{STAMP}</Last-Modified><Etag>{etag_of(i)}</Etag><Content-Length>4096</Content-Length>"
        "<Content-Type>image/jpeg</Content-Type><Content-Encoding /><Content-Language /><Content-CRC64 />"
        "<Content-MD5>1B2M2Y8AsgTpgAmY7PhCfg==</Content-MD5><Cache-Control /><Content-Disposition />"
        "<BlobType>BlockBlob</BlobType><AccessTier>Hot</AccessTier><AccessTierInferred>true</AccessTierInferred>"
        "<LeaseStatus>unlocked</LeaseStatus><LeaseState>available</LeaseState>"
        f"<ServerEncrypted>true</ServerEncrypted></Properties>{'<Metadata />' if metadata else ''}</Blob>"
    )


def _result_entry(i: int, metadata: bool, stale: bool = False) -> str:
    etag = f"0x8DB{i:013X}" if stale and i % STALE_EVERY == 0 else etag_of(i)  # an older version of the source
    meta = (
        f"<Metadata><blobscore_source_etag>{etag}</blobscore_source_etag><blobscore_status>ok"
        "</blobscore_status><blobscore_job>j</blobscore_job></Metadata>"
        if metadata else ""
    )
    return (
        f"<Blob><Name>{RESULTS_PREFIX}{SOURCE_PREFIX}{i:07d}.jpg.json</Name><Properties>"
        f"<Creation-Time>{STAMP}</Creation-Time><Last-Modified>{STAMP}</Last-Modified>"
        f"<Etag>0x8DD{i:013X}</Etag><Content-Length>1873</Content-Length>"
        "<Content-Type>application/json</Content-Type><Content-Encoding /><Content-Language /><Content-CRC64 />"
        "<Content-MD5>Q2hlY2sgSW50ZWdyaXR5IQ==</Content-MD5><Cache-Control /><Content-Disposition />"
        "<BlobType>BlockBlob</BlobType><AccessTier>Hot</AccessTier><AccessTierInferred>true</AccessTierInferred>"
        "<LeaseStatus>unlocked</LeaseStatus><LeaseState>available</LeaseState>"
        f"<ServerEncrypted>true</ServerEncrypted></Properties>{meta}</Blob>"
    )


def listing_page(container: str, prefix: str, marker: str, max_results: int, include: str) -> bytes:
    """One List Blobs answer for container `with-N`, `stale-N` or `none-N` (see the module docstring); anything else
    is empty."""
    kind, _, size = container.partition("-")
    count = int(size) if size.isdigit() else 0
    metadata = "metadata" in include.split(",")
    start = int(marker) if marker.isdigit() else 0
    if prefix == SOURCE_PREFIX and kind in KINDS:
        entries = "".join(_source_entry(i, metadata) for i in range(start, min(count, start + max_results)))
    elif prefix == RESULTS_PREFIX and kind in ("with", "stale"):
        stale = kind == "stale"
        entries = "".join(_result_entry(i, metadata, stale) for i in range(start, min(count, start + max_results)))
    else:
        count, entries = 0, ""
    end = min(count, start + max_results)
    next_marker = str(end) if end < count else ""
    return (
        '<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint="http://127.0.0.1/" '
        f'ContainerName="{container}"><Prefix>{prefix}</Prefix><Marker>{marker}</Marker>'
        f"<MaxResults>{max_results}</MaxResults><Blobs>{entries}</Blobs><NextMarker>{next_marker}</NextMarker>"
        "</EnumerationResults>"
    ).encode()


def serve(port: int) -> None:
    """Answer List Blobs until killed."""

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
            body = listing_page(url.path.strip("/").split("/")[-1], query.get("prefix", ""), query.get("marker", ""),
                                int(query.get("maxresults", "5000")), query.get("include", ""))
            self._reply(200, body, {"Content-Type": "application/xml"})

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
# The carrier process


def status_kb(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def mb(kb: float) -> float:
    return round(kb / 1024, 1)


def carrier(config: dict[str, Any]) -> dict[str, Any]:
    """One run, in this process: the job created as the CLI does, then list_step until done (or the old loop)."""
    from producer.carrier import CarrierDeps, list_step, unpack_cursor
    from producer.publishing import TaskPublisher
    from worker.celery_app import publisher_app
    from worker.contracts import ImageTask
    from worker.jobs import JobSpec, JobStore
    from worker.redis_client import open_redis
    from worker.settings import load_settings
    from worker.storage import BlobStore

    settings = load_settings(Path.cwd(), broker_url=config["broker"], queue=QUEUE, service=SERVICE,
                             blob_connection_string=connection_string(config["port"]))
    store = BlobStore.from_settings(settings)
    jobs = JobStore(open_redis(settings.jobs_url), settings.key_prefix)
    publisher = TaskPublisher(publisher_app(settings), settings.queue_for(SERVICE))
    jobs.client.ping()
    container = config["container"]
    spec = JobSpec(container, SOURCE_PREFIX, SERVICE, container, RESULTS_PREFIX)
    window, page_size = config["window"], config["page_size"]
    rss_ready = status_kb("VmRSS")
    ready_at = time.time()

    published: dict[str, Any] = {"count": 0, "first": None}

    def publish(tasks: list[ImageTask]) -> None:
        publisher(tasks)
        published["count"] += len(tasks)
        if published["first"] is None:
            published["first"] = time.perf_counter() - started

    profile = cProfile.Profile() if config.get("profile") else None
    if profile is not None:
        profile.enable()
    started = time.perf_counter()
    job_id = jobs.create(spec, settings.deployment, extra={
        "window": window, "page_size": max(1, min(page_size, window // 2)), "limit": "",
    })
    out: dict[str, Any] = {}
    step_rss: list[int] = []
    first_page = None
    if config["mode"] == "carrier":
        asked: list[int] = []
        deps = CarrierDeps(store, jobs, lambda _service, tasks: publish(tasks),
                           lambda _job, generation, _countdown: asked.append(generation))
        jobs.bump_listing_generation(job_id, 0)  # what start_listing does before it queues the first step
        cursor_max, ahead_first, actions = 0, None, {}
        while True:
            fields = jobs.fields(job_id)
            cursor_max = max(cursor_max, len(fields.get("results_cursor", "")))
            outcome = list_step(job_id, int(fields["listing_gen"]), deps)
            actions[outcome.action] = actions.get(outcome.action, 0) + 1
            step_rss.append(status_kb("VmRSS"))
            if first_page is None:
                first_page = time.perf_counter() - started
                if profile is None:
                    packed = jobs.fields(job_id).get("results_cursor", "")
                    ahead_first = len(unpack_cursor(packed).ahead)
            if outcome.action == "done":
                break
            if outcome.action not in ("listed",):
                raise RuntimeError(f"unexpected step outcome {outcome} (window {window})")
        fields = jobs.fields(job_id)
        cursor_max = max(cursor_max, len(fields.get("results_cursor", "")))
        out.update(steps=len(step_rss), actions=actions, next_steps_asked=len(asked),
                   skipped_current=int(fields.get("skipped_current", 0)), results_cursor_bytes_max=cursor_max,
                   cursor_ahead_after_first_step=ahead_first)
    else:
        out.update(old_listing(store, jobs, publish, job_id, spec, page_size, started, step_rss))
        first_page = out.pop("first_page")
    listing_s = time.perf_counter() - started
    if profile is not None:
        profile.disable()
        for order in ("cumulative", "tottime"):
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats(order).print_stats(config.get("top", 35))
            print(text.getvalue(), file=sys.stderr)
    quarter = [step_rss[max(0, round(len(step_rss) * q) - 1)] for q in (0.25, 0.5, 0.75, 1.0)] if step_rss else []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.update(
        job_id=job_id, queue=settings.queue_for(SERVICE), ready_at=ready_at, first_page_s=first_page,
        first_task_s=published["first"], listing_s=listing_s, queued=published["count"], rss_mb_ready=mb(rss_ready),
        rss_mb_peak=mb(status_kb("VmHWM")),
        rss_mb_end=mb(status_kb("VmRSS")), rss_mb_by_step=[mb(step_rss[0]), *(mb(kb) for kb in quarter)],
        carrier_cpu_s=usage.ru_utime + usage.ru_stime,
    )
    return out


def old_listing(store: Any, jobs: Any, publish: Any, job_id: str, spec: Any, page_size: int, started: float,
                step_rss: list[int]) -> dict[str, Any]:
    """The producer before the carrier: every result into one dict, then the pages (run_listing of 129a565)."""
    from producer.enqueue import task_for, wanted_on_page
    from producer.listing import current_results

    results = current_results(store.list_metadata(spec.results_container, spec.results_prefix), spec.results_prefix)
    results_s = time.perf_counter() - started
    rss_after_results = status_kb("VmRSS")
    origin = jobs.origin(job_id)
    index, page_no, skipped, first_page = 0, 0, 0, None
    for page in store.list_pages(spec.container, spec.prefix, None, page_size):
        wanted, page_skipped = wanted_on_page(page, spec, results, ())
        skipped += page_skipped
        if wanted:
            jobs.record_page(job_id, page_no, index, [blob.name for blob in wanted])
            publish([task_for(job_id, index + offset, spec, blob, origin) for offset, blob in enumerate(wanted)])
            index, page_no = index + len(wanted), page_no + 1
        jobs.advance(job_id, page.continuation, index, page_no)
        step_rss.append(status_kb("VmRSS"))
        if first_page is None:
            first_page = time.perf_counter() - started
    jobs.finish_listing(job_id)
    return {"first_page": first_page, "results_dict_s": results_s, "results_in_dict": len(results),
            "rss_mb_after_results_dict": mb(rss_after_results), "steps": len(step_rss), "skipped_current": skipped}


# ---------------------------------------------------------------------------------------------------------------
# Driving the runs


def proc_cpu_s(pid: int) -> float:
    """utime + stime of process `pid`, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Polls the carrier's VmRSS (50 ms) and Redis used_memory (200 ms) while the carrier runs."""

    def __init__(self, pid: int, client: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.pid, self.client = pid, client
        self.rss_max_kb, self.redis_max = 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        tick = 0
        while not self.stop.is_set():
            self.rss_max_kb = max(self.rss_max_kb, proc_rss_kb(self.pid))
            if tick % 4 == 0:
                self.redis_max = max(self.redis_max, int(self.client.info("memory")["used_memory"]))
            tick += 1
            self.stop.wait(0.05)


def job_keys_bytes(client: redis.Redis, job_id: str) -> int:
    """MEMORY USAGE of the job's own keys (record, pages, lock, exclusions): not the queued messages."""
    total = 0
    for key in client.scan_iter(match=f"*job:{job_id}*", count=1000):
        total += int(client.memory_usage(key, samples=0) or 0)
    return total


def one_run(workdir: Path, args: argparse.Namespace, port: int, redis_port: int, redis_pid: int, endpoint_pid: int,
            size: int, kind: str, mode: str, profile: bool) -> dict[str, Any]:
    """Flush Redis, run one carrier process, return its figures with what was sampled around it."""
    broker = f"redis://127.0.0.1:{redis_port}/0"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    before = int(client.info("memory")["used_memory"])
    config = {"broker": broker, "port": port, "container": f"{kind}-{size}", "window": args.window,
              "page_size": args.page_size, "mode": mode, "profile": profile, "top": args.top}
    cpu_before = {"endpoint": proc_cpu_s(endpoint_pid), "redis": proc_cpu_s(redis_pid)}
    launched = time.time()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BLOBSCORE_")}, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--carrier", json.dumps(config)],
                             stdout=subprocess.PIPE, stderr=None if profile else subprocess.PIPE, env=env,
                             cwd=workdir, text=True)
    sampler = Sampler(child.pid, client)
    sampler.start()
    stdout, stderr = child.communicate()
    sampler.stop.set()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"carrier run {kind}-{size} {mode} failed ({child.returncode}):\n{(stderr or '')[-3000:]}")
    out: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    after = int(client.info("memory")["used_memory"])
    job_bytes = job_keys_bytes(client, out["job_id"])
    queued_messages = int(client.llen(out.pop("queue")) or 0)  # type: ignore[arg-type]
    client.flushdb()
    client.close()
    out = {
        "size": size, "results": RESULTS_LABEL[kind], "mode": mode,
        "startup_s": round(out.pop("ready_at") - launched, 2), **out,
        "endpoint_cpu_s": round(proc_cpu_s(endpoint_pid) - cpu_before["endpoint"], 1),
        "redis_cpu_s": round(proc_cpu_s(redis_pid) - cpu_before["redis"], 1),
        "rss_mb_sampled_max": mb(sampler.rss_max_kb),
        "queue_messages": queued_messages,
        "redis_job_mb": round(job_bytes / 2**20, 3),
        "redis_queue_mb": round((after - before - job_bytes) / 2**20, 1),
        "redis_peak_mb": round((max(sampler.redis_max, after) - before) / 2**20, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    out["names_per_s"] = round(size / out["listing_s"])
    for key in ("first_page_s", "first_task_s", "listing_s", "results_dict_s", "carrier_cpu_s"):
        if isinstance(out.get(key), float):
            out[key] = round(out[key], 3 if key.startswith("first") else 1)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the endpoint and Redis, do every run, stop both."""
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="listing-scale-") as tmp:
        workdir = Path(tmp)
        port, redis_port = free_port(), free_port()
        endpoint = ManagedProcess.start([sys.executable, str(Path(__file__).resolve()), "--serve", str(port)],
                                        workdir / "endpoint.log", cwd=workdir)
        redis_server = start_redis(redis_port, workdir / "redis")
        try:
            endpoint.wait_for_log("listening on", 30)
            plan = [(size, kind, "carrier") for size in args.sizes for kind in args.runs]
            plan += [(size, "stale", "old") for size in args.old_at]
            for size, kind, mode in plan:
                result = one_run(workdir, args, port, redis_port, redis_server.pid, endpoint.pid, size, kind, mode,
                                 args.profile)
                print(json.dumps(result), file=sys.stderr, flush=True)
                runs.append(result)
        finally:
            endpoint.stop()
            redis_server.stop()
    return {"page_size": args.page_size, "window": args.window, "cpus": os.cpu_count(), "runs": runs,
            "targets": targets(runs)}


def targets(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets against what was measured."""
    carrier_runs = [run for run in runs if run["mode"] == "carrier"]
    with_results = {run["size"]: run for run in carrier_runs if run["results"] == "all current"}
    out: dict[str, Any] = {}
    stale = {run["size"]: run for run in carrier_runs if run["results"] == RESULTS_LABEL["stale"]}
    if 1_000_000 in with_results:
        out["first_page_with_1m_results_s"] = with_results[1_000_000]["first_page_s"]
    if 1_000_000 in stale:
        first = stale[1_000_000]["first_task_s"]
        out["first_task_with_1m_results_s"] = first
        out["first_task_with_1m_results_le_5s"] = first is not None and first <= 5
    if carrier_runs:
        peaks = [run["rss_mb_peak"] for run in carrier_runs]
        out["carrier_rss_mb_peak_range"] = [min(peaks), max(peaks)]
        out["carrier_rss_le_150mb"] = max(peaks) <= 150
        by_size: dict[int, float] = {}
        for run in carrier_runs:
            by_size[run["size"]] = max(by_size.get(run["size"], 0.0), run["rss_mb_peak"])
        out["carrier_rss_mb_peak_by_size"] = by_size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--runs", nargs="+", choices=KINDS, default=list(KINDS),
                        help="with: every source has a current result; stale: the same but 1 in 1000 stale (queued); "
                             "none: no results (everything queued)")
    parser.add_argument("--page-size", type=int, default=5000)
    parser.add_argument("--window", type=int, default=10_000_000)
    parser.add_argument("--old-at", type=int, nargs="*", default=[100_000], metavar="N",
                        help="also run the old whole-results-dict producer at these sizes, with results (none: skip)")
    parser.add_argument("--profile", action="store_true", help="cProfile every carrier run, tables on stderr")
    parser.add_argument("--top", type=int, default=35, help="functions per cProfile table")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--carrier", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.carrier:
        print(json.dumps(carrier(json.loads(args.carrier))), flush=True)
        return
    result = run(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
