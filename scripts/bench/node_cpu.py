"""CPU the node daemon spends per request on its local port, per shape.

    .venv/bin/python scripts/bench/node_cpu.py [--requests 1000] [--chunks 16]
        [--rounds 3] [--profile OUT_PREFIX]

Starts the FAKE OpenAI server (``tests/node/fake_openai_server.py``: canned words,
no model) and a real ``meshgate-node run --no-connect --upstream bench=...``, then
sends ``--requests`` requests of each shape (non-streaming, and a ``--chunks``-chunk
stream) to the node's local port over one kept-alive connection, ``--rounds``
times interleaved, and reads the daemon's CPU seconds (user + system, psutil)
before and after each batch: the node's CPU per request, which does not depend on
how loaded the box is the way wall time does. With ``--profile`` it also runs
py-spy (``.venv/bin/pip install py-spy``) on the daemon during one extra batch of
each shape and writes ``OUT_PREFIX-{shape}.txt`` (py-spy's raw, collapsed stacks).
"""

from __future__ import annotations

import argparse
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
    """A daemon of the code in `source` (this tree, or another checkout: ``python -m``
    imports from its working directory first)."""
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


def system_of(process: psutil.Process) -> float:
    return float(process.cpu_times().system)


def batch(client: httpx.Client, url: str, body: dict[str, Any], n: int,
          process: psutil.Process) -> float:
    """The daemon's CPU milliseconds per request over `n` requests."""
    before, system = cpu_of(process), system_of(process)
    for _ in range(n):
        one_request(client, url, body)
    kernel = (system_of(process) - system) * 1000 / n
    total = (cpu_of(process) - before) * 1000 / n
    print(f"  {n} x {'stream' if body.get('stream') else 'non-stream'}: {total:.3f} ms CPU a "
          f"request, {kernel:.3f} of it in the kernel", flush=True)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path,
                        help="another checkout (e.g. `git archive main | tar -x -C DIR`): its "
                             "daemon is measured too, interleaved, on the same upstream")
    parser.add_argument("--profile", help="py-spy output prefix (one extra batch per shape)")
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
        nodes: dict[str, tuple[subprocess.Popen[bytes], psutil.Process, str]] = {}
        try:
            for i, (label, source) in enumerate(sources.items()):
                node, url = start_node(root, upstream, source, f"node{i}")
                nodes[label] = (node, psutil.Process(node.pid), f"{url}/chat/completions")
            client = httpx.Client(timeout=60)
            for _, _, target in nodes.values():  # warm up: imports, pools
                for shape_body in shapes.values():
                    for _ in range(50):
                        one_request(client, target, shape_body)
            results: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.rounds):
                for label, (_, process, target) in nodes.items():
                    for shape, shape_body in shapes.items():
                        print(f"{label}:", end="")
                        results.setdefault((label, shape), []).append(
                            batch(client, target, shape_body, args.requests, process))
            print(f"node daemon CPU per request (ms), {args.requests} requests x {args.rounds} "
                  f"rounds, {args.chunks}-chunk stream; load {psutil.getloadavg()}")
            for (label, shape), values in results.items():
                print(f"{label:<10} {shape:<12} median {statistics.median(values):.3f}  "
                      f"all {' '.join(f'{v:.3f}' for v in values)}")
            if args.profile:
                node, process, target = nodes["this tree"]
                spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
                for shape, shape_body in shapes.items():
                    out = f"{args.profile}-{shape}.txt"
                    rec = subprocess.Popen(
                        [spy, "record", "-r", "1000", "-f", "raw", "-o", out, "-p",
                         str(node.pid), "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1.0)
                    batch(client, target, shape_body, args.requests, process)
                    rec.send_signal(2)
                    rec.wait(30)
                    print(f"profile: {out}")
        finally:
            for node, _, _ in nodes.values():
                node.terminate()
                node.wait(10)
            fake.kill()


if __name__ == "__main__":
    main()
