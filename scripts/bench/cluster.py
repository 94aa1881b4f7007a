"""What a cluster replica costs per request, and what three replicas give over one.

    .venv/bin/python scripts/bench/cluster.py [--requests 300] [--seconds 10]
        [--concurrency 24] [--json OUT.json]

Starts, on loopback in a temporary directory, one instant FAKE OpenAI upstream
(``tests/node/fake_openai_server.py``: canned words, no model, so only meshgate's own
cost shows) and in front of it:

* ``single``: one coordinator on SQLite with its limits in memory, one node;
* ``replica``: three coordinator replicas on one PostgreSQL and one Redis (the real
  engines, as the cluster tests start them), one node with a tunnel to each, HAProxy in
  front of their API ports.

Both keys have an rpm limit (a high one, never reached) so every request runs the rate
limiter: in memory for ``single``, the Lua script on Redis for ``replica``.

1. Latency: the same non-streaming request, interleaved single / replica so drift hits
   both alike, straight to each coordinator's API (no balancer): p50, p99, the p50 ratio
   and the added milliseconds.
2. Throughput: ``--concurrency`` clients for ``--seconds`` through HAProxy with three
   replicas, then through HAProxy with one replica: requests per second and the ratio.
   Every process shares this box's cores (two on the shared VM): three replicas cannot
   add CPU here, so this measures the cost of spreading, not the gain of more machines.

Two runs on the shared two-core VM (load average 10-20 from other work):
latency, single vs replica p50 5.86 vs 6.91 ms (x1.18, +1.06 ms; p99 50.4 vs 56.6) and
7.42 vs 9.07 ms (x1.22, +1.65 ms; p99 37.8 vs 35.4); throughput, 24 clients, three
replicas vs one 58.6 vs 42.3 req/s (x1.38) and 80.6 vs 97.8 req/s (x0.82): on two shared
cores the replica count changes nothing measurable but noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.cluster.engines import PostgresServer, RedisServer, free_port, wait_port  # noqa: E402
from tests.cluster.harness import HAPROXY_CFG, Cluster  # noqa: E402
from tests.e2e.mesh import Mesh, cli, last_line, wait_until  # noqa: E402

MODEL = "bench"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def post(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    reply = client.post(url, json=BODY)
    elapsed = time.perf_counter() - started
    reply.raise_for_status()
    return elapsed


def haproxy(root: Path, name: str, ports: list[int]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    servers = "\n".join(f"    server r{i} 127.0.0.1:{p} check inter 1s" for i, p in
                        enumerate(ports))
    cfg = root / f"{name}.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, servers=servers))
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)],
                            stdout=(root / f"{name}.log").open("wb"), stderr=subprocess.STDOUT)
    wait_port(port)
    return proc, port


def throughput(url: str, key: str, seconds: float, concurrency: int) -> float:
    done = [0]
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            while time.monotonic() < stop:
                try:
                    post(http, url)
                    with lock:
                        done[0] += 1
                except httpx.HTTPError:
                    with lock:
                        errors[0] += 1
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors[0]:
        print(f"  ({errors[0]} errors at {url})", file=sys.stderr)
    return done[0] / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="meshgate-bench-cluster-"))
    postgres = PostgresServer()
    redis = RedisServer(root)
    cluster = Cluster(root / "c", postgres, redis, root / "coordinator.toml")
    (root / "c").mkdir()
    (root / "s").mkdir()
    cluster.config.write_text("[dispatch]\nnode_slots = 64\nqueue_size = 1024\n")
    single = Mesh(root / "s", free_port(), free_port())
    lbs: list[subprocess.Popen[bytes]] = []
    try:
        upstream_port = cluster.start_fake_upstream(MODEL, "--chunks", "8")
        upstream = f"{MODEL}=http://127.0.0.1:{upstream_port}/v1"
        single.start_coordinator("--config", str(cluster.config), "--log-level", "warning")
        assert single.enroll("node").returncode == 0
        single.start_node("node", extra=("--upstream", upstream))
        single_key = last_line(cli("coordinator", "key", "create", "--state-dir",
                                   str(single.coord_state), "--name", "b", "--rpm", "1000000"))
        single.key = single_key
        single.wait_serving(MODEL, 60)
        cluster.start_replicas("a", "b", "c")
        cluster.start_nodes({"node": ("--upstream", upstream)})
        cluster.wait_nodes(list(cluster.replicas.values()), 1, 60)
        replica_key = cluster.admin("key", "create", "--name", "b", "--rpm", "1000000")
        a = cluster.replicas["a"]
        wait_until(lambda: MODEL in a.health()["node_models"], 60, "model")  # type: ignore[operator]

        targets = {
            "single": (httpx.Client(headers={"Authorization": f"Bearer {single_key}"}),
                       f"http://127.0.0.1:{single.api_port}/v1/chat/completions"),
            "replica": (httpx.Client(headers={"Authorization": f"Bearer {replica_key}"}),
                        f"{a.api}/v1/chat/completions"),
        }
        times: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(20):  # warm up both
            for client, url in targets.values():
                post(client, url)
        for _ in range(args.requests):
            for name, (client, url) in targets.items():
                times[name].append(post(client, url))
        report: dict[str, Any] = {"latency": {}, "throughput": {}}
        print(f"latency, {args.requests} non-streaming requests each, interleaved:")
        base = statistics.median(times["single"])
        for name, values in times.items():
            p50, p99 = statistics.median(values), percentile(values, 0.99)
            report["latency"][name] = {"p50_ms": p50 * 1000, "p99_ms": p99 * 1000}
            print(f"  {name:8s} p50 {p50 * 1000:7.2f} ms  p99 {p99 * 1000:7.2f} ms  "
                  f"x{p50 / base:.2f}  (+{(p50 - base) * 1000:.2f} ms p50)")
        ports = [r.api_port for r in cluster.replicas.values()]
        three, three_port = haproxy(root, "lb3", ports)
        one, one_port = haproxy(root, "lb1", ports[:1])
        lbs += [three, one]
        url3 = f"http://127.0.0.1:{three_port}/v1/chat/completions"
        url1 = f"http://127.0.0.1:{one_port}/v1/chat/completions"
        rps3 = throughput(url3, replica_key, args.seconds, args.concurrency)
        rps1 = throughput(url1, replica_key, args.seconds, args.concurrency)
        report["throughput"] = {"three_replicas_rps": rps3, "one_replica_rps": rps1,
                                "ratio": rps3 / rps1, "concurrency": args.concurrency}
        print(f"throughput, {args.concurrency} clients for {args.seconds:g} s through HAProxy "
              "(every process on this box's cores):")
        print(f"  three replicas {rps3:7.1f} req/s   one replica {rps1:7.1f} req/s   "
              f"x{rps3 / rps1:.2f}")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        for lb in lbs:
            lb.terminate()
        cluster.stop()
        for proc in [single.coordinator, *single.nodes.values()]:
            if proc is not None:
                proc.stop()
        redis.stop()
        postgres.remove()


if __name__ == "__main__":
    main()
