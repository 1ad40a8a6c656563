"""What the worker's two Blob calls per image cost in CPU: the SDK's own calls against worker/blob_requests.py.

A private in-memory Azurite; a camera-sized photo (1.3 MB) and a tiny crop (3 KB) downloaded with the 50 MB cap the
worker asks for, and a result document written create-only with the worker's metadata. Each way is timed
(`time.process_time`: this process only, not Azurite) over `--calls` calls, in turns, `--rounds` times; the medians
are printed as one JSON object.

    .venv/bin/python bench/blob_calls.py [--calls 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from azure.storage.blob import ContentSettings

from deploy.local.azurite import connection_string, start_azurite
from deploy.local.procs import free_port
from worker.settings import load_settings
from worker.storage import BlobStore

CAP = 50 * 1024 * 1024
METADATA = {"blobscore_status": "ok", "blobscore_source_etag": "0x8DC0123456789AB", "blobscore_job": "job",
            "blobscore_code": ""}


def cpu_ms(call: Callable[[], object], calls: int) -> float:
    """CPU milliseconds of this process per call."""
    call()
    started = time.process_time()
    for _ in range(calls):
        call()
    return (time.process_time() - started) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="blob-calls-"))
    port = free_port()
    azurite = start_azurite(port, workdir / "azurite.log")
    try:
        settings = load_settings(workdir, blob_connection_string=connection_string(port), queue="bench",
                                 service="bench")
        store = BlobStore.from_settings(settings)
        service = store._service
        container = service.create_container(f"bench-{uuid.uuid4().hex[:8]}")
        photos = {"photo 1.3 MB": os.urandom(1_300_000), "tiny 3 KB": os.urandom(3_000)}
        for name, data in photos.items():
            container.upload_blob(name, data)
        body = json.dumps({"labels": [{"label": "tabby", "score": 0.5}] * 5}).encode()
        written = iter(range(10**9))

        def sdk_download(name: str) -> bytes:
            stream = service.get_blob_client(container.container_name, name).download_blob(
                offset=0, length=CAP + 1, max_concurrency=1)
            return stream.readall()

        def sdk_write() -> None:
            service.get_blob_client(container.container_name, f"sdk/{next(written)}.json").upload_blob(
                body, metadata=METADATA, content_settings=ContentSettings(content_type="application/json"),
                overwrite=False)

        def our_write() -> None:
            store.write_result(container.container_name, f"ours/{next(written)}.json", body, METADATA, None)

        ways: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
            f"download, {name}": ((lambda n=name: sdk_download(n)),
                                  (lambda n=name: store.download(container.container_name, n, CAP)))
            for name in photos
        }
        ways["create-only result write"] = (sdk_write, our_write)
        figures: dict[str, dict[str, list[float]]] = {what: {"sdk": [], "ours": []} for what in ways}
        for _ in range(args.rounds):
            for what, (sdk, ours) in ways.items():
                figures[what]["sdk"].append(cpu_ms(sdk, args.calls))
                figures[what]["ours"].append(cpu_ms(ours, args.calls))
        medians = {what: (statistics.median(f["sdk"]), statistics.median(f["ours"])) for what, f in figures.items()}
        report = {what: {"sdk_ms": round(sdk, 3), "ours_ms": round(ours, 3), "saved_ms": round(sdk - ours, 3)}
                  for what, (sdk, ours) in medians.items()}
        print(json.dumps({"calls": args.calls, "rounds": args.rounds, "load": os.getloadavg()[0], **report}, indent=2))
    finally:
        azurite.stop()


if __name__ == "__main__":
    main()
