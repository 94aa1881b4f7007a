"""Idle memory of the node daemon: a fresh ``meshgate-node run`` with no runner.

    .venv/bin/python scripts/bench/idle_rss.py [--runs 3] [--settle 3] [--connected]
        [--json OUT.json]

Starts the daemon (no model, no coordinator link, loopback port, fresh state
dir; with ``--connected``, enrolled with a real coordinator started on loopback
for the run and linked to it: tunnel, crypto and heartbeats loaded) ``--runs``
times, waits until ``/healthz`` answers, lets it settle (a
telemetry sample or two) and reads its RSS and USS (psutil's
``memory_full_info``): the fresh idle figure, issue 10's. Then it sends one
request to each local route family (request validation and the other lazily
imported code load) and reads them again after another settle: the "touched"
figure. Prints each run and the medians, in MiB, plus the modules that weigh
most at import (``-X importtime``), to see what to defer.
Issue 10's target: idle RSS <= 60 MB.
"""

from __future__ import annotations

import argparse
import json
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

from tests.e2e.mesh import Mesh, free_port, wait_until  # noqa: E402

MiB = 1 << 20


def one_run(settle: float, connected: bool = False) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="mg-rss-") as tmp:
        port = free_port()
        mesh = None
        state = Path(tmp) / "node"
        link = ["--no-connect"]
        if connected:  # a real coordinator on loopback, the node enrolled with it
            mesh = Mesh(root=Path(tmp), api_port=free_port(), tunnel_port=free_port())
            mesh.start_coordinator()
            enrolled = mesh.enroll("node")
            if enrolled.returncode:
                raise SystemExit(f"enroll failed: {enrolled.stderr}")
            link = []
        proc = subprocess.Popen(
            [sys.executable, "-m", "node_agent.cli", "run", "--state-dir", str(state),
             "--proxy-port", str(port), *link, "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        )
        try:
            if mesh is not None:
                wait_until(lambda: mesh.connected_nodes() == 1, 60, "the node's link")
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the node did not start") from None
                    time.sleep(0.1)
            time.sleep(settle)
            idle = psutil.Process(proc.pid).memory_full_info()
            for path in ("/v1/models", "/api/tags", "/metrics", "/nothing"):
                httpx.get(url + path, timeout=5)
            httpx.post(url + "/v1/chat/completions", timeout=5,
                       json={"model": "none", "messages": [{"role": "user", "content": "x"}]})
            time.sleep(settle)
            touched = psutil.Process(proc.pid).memory_full_info()
            return {"rss_mib": idle.rss / MiB, "uss_mib": idle.uss / MiB,
                    "touched_rss_mib": touched.rss / MiB, "touched_uss_mib": touched.uss / MiB}
        finally:
            proc.terminate()
            proc.wait(30)
            if mesh is not None:
                mesh.stop()


def heaviest_imports(top: int = 15) -> list[tuple[str, int]]:
    """Third-party packages the daemon imports at start, by cumulative import time (us)."""
    code = "import node_agent.cli, node_agent.daemon"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT,
                         capture_output=True, text=True, check=True).stderr
    totals: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        package = parts[2].strip().split(".")[0]
        if package not in ("node_agent", "meshgate", "tunnel", "coordinator"):
            totals[package] = max(totals.get(package, 0), int(parts[1]))
    return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--connected", action="store_true",
                        help="enrolled and linked to a real coordinator on loopback")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = [one_run(args.settle, args.connected) for _ in range(args.runs)]
    print("connected to a coordinator" if args.connected else "not connected (--no-connect)")
    for i, r in enumerate(runs):
        print(f"run {i + 1}: idle RSS {r['rss_mib']:.1f} MiB, USS {r['uss_mib']:.1f} MiB; "
              f"after one request per route RSS {r['touched_rss_mib']:.1f} MiB, "
              f"USS {r['touched_uss_mib']:.1f} MiB")
    result: dict[str, Any] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    result |= {"runs": runs, "imports_us": heaviest_imports()}
    print(f"median: idle RSS {result['rss_mib']:.1f} MiB, USS {result['uss_mib']:.1f} MiB; "
          f"after requests RSS {result['touched_rss_mib']:.1f} MiB, "
          f"USS {result['touched_uss_mib']:.1f} MiB")
    print("heaviest imports (cumulative us):")
    for name, us in result["imports_us"]:
        print(f"  {name:<40}{us:>10}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
