"""The multithreaded loop a user could write with the same SDKs: the plain loop's body in a ThreadPoolExecutor.

Same per-image work as `bench/baseline_loop.py` (download, one Predict call with blobscore's wire messages, top 5,
upload the JSON result), except that the result is written create-only (If-None-Match: *, as blobscore writes it),
`--threads N` images in flight over one shared BlobServiceClient and one shared gRPC channel. No broker, no job
record, no retries, no image check: the throughput a careful user gets without blobscore.
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
    parser.add_argument("--pool-size", type=int, default=None,
                        help="HTTP connections kept (default: as many as threads; 0: requests' default of 10).")
    args = parser.parse_args()
    # A careful user running N threads over one client keeps N connections, as blobscore's worker does.
    target = connect(args, args.threads if args.pool_size is None else args.pool_size)
    names = list_images(target, args)
    started, cpu_started = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        for future in [pool.submit(score_one, target, name, True) for name in names]:
            future.result()
    print(json.dumps(report(len(names), started, cpu_started, loop="handwritten_threads", threads=args.threads)))


if __name__ == "__main__":
    main()
