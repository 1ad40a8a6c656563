"""The plain loop a user would write from the FPGA service's sample client: one image at a time, no queue.

For each JPEG blob: download it (azure-storage-blob), score it with one Predict call over one gRPC channel (the
sample client's `PredictionClient.score_file`, here with blobscore's lean wire messages instead of TensorFlow's),
take the top 5, upload a small JSON result (overwrite). No broker, no job record, no "is there already a current
result" check, no create-only write: what `bench/pipeline.py` compares blobscore against.

    BLOBSCORE_BLOB_CONNECTION_STRING=... BLOBSCORE_SCORING_KEY=... \
    .venv/bin/python bench/baseline_loop.py --container bench-src --results-container out --address 127.0.0.1:8500

Prints one JSON object: images, elapsed_s (first download to last upload), images_per_s, cpu_ms_per_image
(this process's own CPU time over the loop, all threads), rss_mb (its peak resident set).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import requests
from azure.storage.blob import BlobServiceClient, ContainerClient, ContentSettings
from requests.adapters import HTTPAdapter

from worker import wire

RESNET50_OUTPUT = "classifier_1/resnet_v1_50/predictions/Softmax:0"
DEFAULT_INPUT = "Placeholder:0"
JSON_CONTENT = ContentSettings(content_type="application/json")


@dataclass(frozen=True)
class Target:
    """Where images come from, where they are scored and where results go."""

    source: ContainerClient
    results: ContainerClient
    results_prefix: str
    predict: Callable[..., Any]
    metadata: tuple[tuple[str, str], ...]
    input_name: str
    output_name: str
    timeout_s: float


def parse_args(description: str) -> argparse.ArgumentParser:
    """The options both loops share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--container", required=True, help="Source container.")
    parser.add_argument("--prefix", default="", help="Only blobs whose names start with this.")
    parser.add_argument("--results-container", required=True)
    parser.add_argument("--results-prefix", default="")
    parser.add_argument("--address", required=True, help="HOST:PORT of the scoring service.")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--key-env", default="BLOBSCORE_SCORING_KEY", help="Variable holding the service key.")
    parser.add_argument("--service-name", default="", help="Azure ML service name (the route header).")
    parser.add_argument("--input-name", default=DEFAULT_INPUT)
    parser.add_argument("--output-name", default=RESNET50_OUTPUT)
    parser.add_argument("--timeout-s", type=float, default=10.0)
    parser.add_argument("--limit", type=int, default=None, help="Score the first N listed JPEGs only.")
    parser.add_argument("--shard", type=int, default=0, help="With --shards: take every Nth image from this one.")
    parser.add_argument("--shards", type=int, default=1)
    return parser


def connect(args: argparse.Namespace, pool_size: int | None = None) -> Target:
    """One Blob client and one gRPC channel, as the sample client keeps one channel for its calls.

    `pool_size`: keep that many HTTP connections (requests keeps 10 by default, and urllib3 drops the rest after
    each request without a word: its warning goes to a NullHandler). The SDK's other defaults stay.
    """
    options: dict[str, Any] = {}
    if pool_size:
        session = requests.Session()
        session.mount("http://", HTTPAdapter(pool_maxsize=pool_size))
        session.mount("https://", HTTPAdapter(pool_maxsize=pool_size))
        options["session"] = session
    service = BlobServiceClient.from_connection_string(os.environ["BLOBSCORE_BLOB_CONNECTION_STRING"], **options)
    if args.tls:
        channel = grpc.secure_channel(args.address, grpc.ssl_channel_credentials())
    else:
        channel = grpc.insecure_channel(args.address)
    key = os.environ.get(args.key_env, "")
    return Target(
        source=service.get_container_client(args.container),
        results=service.get_container_client(args.results_container),
        results_prefix=args.results_prefix,
        predict=wire.predict_callable(channel),
        metadata=wire.call_metadata(key or None, args.service_name or None),
        input_name=args.input_name,
        output_name=args.output_name,
        timeout_s=args.timeout_s,
    )


def list_images(target: Target, args: argparse.Namespace) -> list[str]:
    """The JPEG names under the prefix, in listing order; the first --limit, then this shard's share."""
    names = [blob.name for blob in target.source.list_blobs(name_starts_with=args.prefix or None)
             if blob.name.lower().endswith((".jpg", ".jpeg"))]
    names = names[: args.limit] if args.limit else names
    return names[args.shard :: args.shards]


def score_one(target: Target, name: str, create_only: bool = False) -> None:
    """Download, score (one Predict call), top 5, upload the JSON result (overwriting, or only if absent)."""
    data = target.source.download_blob(name).readall()
    request = wire.image_request(data, target.input_name)
    response = target.predict(request, timeout=target.timeout_s, metadata=target.metadata)
    scores = wire.tensor_to_ndarray(response.outputs[target.output_name])[0]
    top = np.argsort(scores)[::-1][:5]
    doc = {"blob": name, "top5": [{"class_id": int(i), "score": float(scores[i])} for i in top],
           "scored_at": time.time()}
    body = json.dumps(doc).encode()
    if create_only:
        # If-None-Match: * (the SDK's default): a second run or a second process never replaces a result.
        target.results.upload_blob(f"{target.results_prefix}{name}.json", body, content_settings=JSON_CONTENT)
    else:
        target.results.upload_blob(f"{target.results_prefix}{name}.json", body, overwrite=True)


def peak_rss_mb() -> float | None:
    """This process's peak resident set (VmHWM), to set beside the worker's.

    Not getrusage's ru_maxrss: Linux carries it over from the parent that forked this process (the benchmark,
    holding the photos it uploaded), so it would report the parent's size.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def report(images: int, started: float, cpu_started: float, **extra: Any) -> dict[str, Any]:
    """The figures both loops print."""
    elapsed = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    ended_at = time.time()
    return {
        "started_at": ended_at - elapsed,
        "ended_at": ended_at,
        "images": images,
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(images / elapsed, 2) if elapsed > 0 else None,
        "cpu_ms_per_image": round(cpu_s * 1000 / images, 3) if images else None,
        "rss_mb": peak_rss_mb(),
        **extra,
    }


def main() -> None:
    """Score every listed image, one at a time."""
    args = parse_args(__doc__ or "").parse_args()
    target = connect(args)
    names = list_images(target, args)
    started, cpu_started = time.perf_counter(), time.process_time()
    for name in names:
        score_one(target, name)
    print(json.dumps(report(len(names), started, cpu_started, loop="baseline")))


if __name__ == "__main__":
    main()
