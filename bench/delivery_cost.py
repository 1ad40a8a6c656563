"""What kombu's delivery path costs per message: kombu's own BRPOP, atomic delivery (worker/kombu_landing.py), and
atomic delivery with one reused Redis client per channel (worker/kombu_clients.py, what a worker runs).

    .venv/bin/python bench/delivery_cost.py [--messages 5000] [--rounds 3]

A private redis-server (no persistence) on a free port; each round publishes --messages task-sized messages and
consumes them with a kombu Consumer (the same `_brpop_start`/`_brpop_read`/`QoS.append` path as Celery's consumer),
acknowledging each, once per path, in turn. Prints one JSON object: per path,
the consuming process's CPU per message (time.process_time) and the Redis server's CPU per message (INFO's
used_cpu_user + used_cpu_sys deltas), each round and the median. Both sides are measured in one run, so compare
the ratio, not the absolute figures, across runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from typing import Any

import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from deploy.local.procs import free_port, wait_for_tcp
from worker import kombu_clients, kombu_landing

# A task message of the size the producer sends (bucket, blob name, job id, namespace, account): ~600 bytes.
BODY = {"container": "photos", "blob": "camera-07/2026/11/29/IMG_000123.jpg", "job_id": "20261129T230000-abcdef12",
        "namespace": "account-1a2b3c4d", "account": {"name": "account", "endpoint": "https://account.blob.core"},
        "etag": "0x8DD1234567890AB", "size": 1_234_567, "service": "resnet50-eastus", "attempt": 0}


def _server_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _round(url: str, client: redis.Redis, messages: int, landing: bool, reuse: bool) -> dict[str, float]:
    name = f"bench-{time.monotonic_ns()}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    kombu_clients.reuse_clients(reuse)
    if landing:
        kombu_landing.land_messages("bench:landing", "bench-worker")
    else:
        kombu_landing.stop_landing()
    received = 0

    def on_message(body: Any, message: Any) -> None:
        nonlocal received
        received += 1
        message.ack()

    with Connection(url) as connection:
        producer = Producer(connection.channel())
        for _ in range(messages):
            producer.publish(BODY, exchange=queue.exchange, routing_key=name, declare=[queue], serializer="json")
        server_before, cpu_before = _server_cpu(client), time.process_time()
        with Consumer(connection.channel(), [queue], callbacks=[on_message]):
            while received < messages:
                connection.drain_events(timeout=10)
        cpu, server = time.process_time() - cpu_before, _server_cpu(client) - server_before
    left = (client.llen(name), client.hlen("unacked"), client.hlen("bench:landing"))
    assert left == (0, 0, 0), f"queue, unacked, landing not empty after the round: {left}"
    return {"client_us_per_message": cpu / messages * 1e6, "server_us_per_message": server / messages * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                                   "--dir", directory], stdout=subprocess.DEVNULL)
        try:
            wait_for_tcp("127.0.0.1", port, 10, "redis-server")
            url = f"redis://127.0.0.1:{port}/0"
            client = redis.Redis.from_url(url)
            paths = {"kombu_brpop": (False, False), "landing": (True, False), "landing_reused_client": (True, True)}
            runs: dict[str, list[dict[str, float]]] = {path: [] for path in paths}
            _round(url, client, 200, landing=True, reuse=True)  # warm-up: imports, script cache
            for _ in range(args.rounds):
                for path, (landing, reuse) in paths.items():
                    runs[path].append(_round(url, client, args.messages, landing=landing, reuse=reuse))
        finally:
            server.terminate()
            server.wait(10)
    medians = {path: {key: round(statistics.median(run[key] for run in rounds), 1) for key in rounds[0]}
               for path, rounds in runs.items()}
    print(json.dumps({
        "messages_per_round": args.messages,
        "median": medians,
        "minus_kombu_brpop_us": {path: {key: round(medians[path][key] - medians["kombu_brpop"][key], 1)
                                        for key in medians[path]} for path in medians if path != "kombu_brpop"},
        "rounds": {path: [{key: round(value, 1) for key, value in run.items()} for run in rounds]
                   for path, rounds in runs.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
