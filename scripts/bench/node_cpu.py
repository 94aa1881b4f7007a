"""The node daemon's local port, this tree against a baseline: CPU per request and added latency.

    .venv/bin/python scripts/bench/node_cpu.py [--requests 1000] [--chunks 16]
        [--baseline DIR] [--profile OUT_PREFIX]

Starts the FAKE OpenAI server (``tests/node/fake_openai_server.py``: canned words,
no model) and a real ``meshgate-node run --no-connect --upstream bench=...`` of this
tree and, with ``--baseline DIR``, one of another checkout (``git archive REV | tar -x
-C DIR``: ``python -m`` imports from its working directory first), all on the same
upstream. For each shape (non-streaming, and a ``--chunks``-chunk stream) it sends
``--requests`` requests round-robin: straight to the upstream (``direct``), then to
each daemon, so drift and the box's load hit all alike, and reports per daemon:

* CPU milliseconds a request (user + system of the daemon process, psutil, read
  before and after the shape's run; it serves only its own requests), which
  depends far less on how loaded the box is than wall time;
* the p50 of the wall time and the added p50 against ``direct``.

With ``--profile`` it then runs py-spy (``.venv/bin/pip install py-spy``) on this
tree's daemon during ``--requests`` more requests of each shape and writes
``OUT_PREFIX-{shape}.txt`` (py-spy's raw, collapsed stacks).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.overhead import MODEL, one_request, start_fake_upstream  # noqa: E402
from tests.e2e.mesh import free_port, wait_until  # noqa: E402


def start_node(root: Path, upstream: str, source: Path = ROOT,
               name: str = "node") -> tuple[subprocess.Popen[bytes], str]:
    """A daemon of the code in `source` serving `upstream` as ``bench``; (process, /v1 URL)."""
    port = free_port()
    log = (root / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "node_agent.cli", "run", "--state-dir", str(root / name),
         "--proxy-port", str(port), "--no-connect", "--upstream", f"{MODEL}={upstream}",
         "--log-level", "info"],
        stdout=log, stderr=subprocess.STDOUT, cwd=source,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return MODEL in httpx.get(f"{url}/healthz", timeout=1).json()["models"]
        except httpx.HTTPError:
            return False

    wait_until(ready, 60, "node daemon")
    return proc, f"{url}/v1"


def cpu_of(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def run_shape(targets: dict[str, tuple[httpx.Client, str, psutil.Process | None]],
              body: dict[str, Any], requests: int) -> dict[str, dict[str, float]]:
    """`requests` rounds of one request to each target; per target p50 ms and CPU ms a request."""
    for client, url, _ in targets.values():  # warm up: imports, pools
        for _ in range(30):
            one_request(client, url, body)
    times: dict[str, list[float]] = {name: [] for name in targets}
    before = {name: cpu_of(p) for name, (_, _, p) in targets.items() if p is not None}
    for _ in range(requests):
        for name, (client, url, _) in targets.items():
            times[name].append(one_request(client, url, body))
    out = {}
    for name, (_, _, process) in targets.items():
        cpu = (cpu_of(process) - before[name]) * 1000 / requests if process else float("nan")
        out[name] = {"p50_ms": statistics.median(times[name]) * 1000, "cpu_ms": cpu}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--baseline", type=Path, help="another checkout, measured beside this one")
    parser.add_argument("--profile", help="py-spy output prefix (one extra run per shape)")
    args = parser.parse_args()

    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hi."}],
                            "max_tokens": 16, "temperature": 0}
    shapes = {"non-stream": body, "stream": {**body, "stream": True}}
    sources = {"this tree": ROOT}
    if args.baseline:
        sources["baseline"] = args.baseline.resolve()
    with tempfile.TemporaryDirectory(prefix="mg-cpu-") as tmp:
        root = Path(tmp)
        fake, upstream = start_fake_upstream(root, args.chunks)
        nodes: list[subprocess.Popen[bytes]] = []
        try:
            targets: dict[str, tuple[httpx.Client, str, psutil.Process | None]] = {
                "direct": (httpx.Client(timeout=60), f"{upstream}/chat/completions", None)}
            for i, (label, source) in enumerate(sources.items()):
                node, url = start_node(root, upstream, source, f"node{i}")
                nodes.append(node)
                targets[label] = (httpx.Client(timeout=60), f"{url}/chat/completions",
                                  psutil.Process(node.pid))
            load = os.getloadavg()[0]
            rows = {shape: run_shape(targets, shape_body, args.requests)
                    for shape, shape_body in shapes.items()}
            load = max(load, os.getloadavg()[0])
            print(f"node local port: {args.requests} requests per target and shape, round-robin, "
                  f"{args.chunks}-chunk stream; load average up to {load:.2f} on "
                  f"{os.cpu_count()} cores")
            print(f"{'shape':<12}{'target':<11}{'p50 ms':>9}{'added p50 ms':>14}"
                  f"{'CPU ms/request':>16}")
            for shape, row in rows.items():
                for name, r in row.items():
                    added = r["p50_ms"] - row["direct"]["p50_ms"]
                    cpu = "" if name == "direct" else f"{r['cpu_ms']:.3f}"
                    print(f"{shape:<12}{name:<11}{r['p50_ms']:>9.3f}{added:>14.3f}{cpu:>16}")
            if args.profile:
                spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
                client, url, _ = targets["this tree"]
                for shape, shape_body in shapes.items():
                    out = f"{args.profile}-{shape}.txt"
                    rec = subprocess.Popen(
                        [spy, "record", "-r", "1000", "-f", "raw", "-o", out, "-p",
                         str(nodes[0].pid), "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1.0)
                    for _ in range(args.requests):
                        one_request(client, url, shape_body)
                    rec.send_signal(2)
                    rec.wait(30)
                    print(f"profile: {out}")
        finally:
            for node in nodes:
                node.terminate()
                node.wait(10)
            fake.kill()


if __name__ == "__main__":
    main()
