"""The multithreaded loop a user could write with the same SDKs: the plain loop's body in a ThreadPoolExecutor.

Same per-image work as `bench/baseline_loop.py` (download, one Predict call, top 5, upload the JSON result with
overwrite), `--threads N` images in flight over one shared BlobServiceClient and one shared gRPC channel. No broker,
no job record, no retries, no exactly-one-result guarantee: the throughput a careful user gets without blobscore.
`bench/pipeline.py` runs one such process per worker process (`--shard i --shards P`), same in-flight count.

    .venv/bin/python bench/handwritten_threads.py --threads 32 --container bench-src --results-container out \
        --address 127.0.0.1:8500

Prints one JSON object, like the plain loop.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

from baseline_loop import connect, list_images, parse_args, report, score_one


def main() -> None:
    """Score every listed image, --threads at a time."""
    parser = parse_args(__doc__ or "")
    parser.add_argument("--threads", type=int, default=16, help="Images in flight.")
    args = parser.parse_args()
    target = connect(args)
    names = list_images(target, args)
    started, cpu_started = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        for future in [pool.submit(score_one, target, name) for name in names]:
            future.result()
    print(json.dumps(report(len(names), started, cpu_started, loop="handwritten_threads", threads=args.threads)))


if __name__ == "__main__":
    main()
