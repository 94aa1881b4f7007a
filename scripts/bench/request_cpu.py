"""CPU time per request of each process on the coordinator path, and where it goes.

    .venv/bin/python scripts/bench/request_cpu.py [--requests 400] [--chunks 16]
        [--profile DIR] [--loop uvloop]

Starts a real coordinator and a real enrolled node (subprocesses, loopback
websockets tunnel, SQLite store) in front of the instant FAKE OpenAI upstream of
the tests (``tests/node/fake_openai_server.py``: canned words, no model), then
sends the same chat request through the coordinator ``--requests`` times one
after another, non-streaming and then streamed (``--chunks`` chunks), and reads
each process's user+system CPU time (psutil) before and after. Idle CPU (the
node's telemetry, the tunnel's pings) is measured over the same wall time with
no request and taken off, so the figure is what one request costs each process.

Wall time on a shared box says little; CPU time per process says which process
pays and does not move with the neighbours' load (it does with the CPU's clock:
compare figures from one run, or runs on the same quiet box). With ``--profile
DIR`` py-spy (``pip install py-spy``) samples the coordinator and the node at a
high rate during the timed requests and writes a speedscope file per process and
shape to DIR (open it on https://www.speedscope.app, or read ``--format raw``).
"""

from __future__ import annotations

import argparse
import shutil
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
from tests.e2e.mesh import Mesh, free_port  # noqa: E402


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, proc in procs.items():
        times = proc.cpu_times()
        out[name] = times.user + times.system
    return out


def profiled(pid: int, out: Path | None, rate: int) -> subprocess.Popen[bytes] | None:
    if out is None:
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "speedscope",
         "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def run_shape(client: httpx.Client, url: str, body: dict[str, Any], requests: int,
              procs: dict[str, psutil.Process], profile: Path | None, shape: str,
              rate: int) -> dict[str, float]:
    """CPU ms per request for each process (idle CPU over the same wall time taken off)."""
    spies = [profiled(p.pid, profile / f"{shape}-{name}.json" if profile else None, rate)
             for name, p in procs.items() if name != "upstream"]
    time.sleep(1.0 if profile else 0)  # py-spy attaches
    before = cpu_seconds(procs)
    started = time.perf_counter()
    for _ in range(requests):
        one_request(client, url, body)
    wall = time.perf_counter() - started
    after = cpu_seconds(procs)
    for spy in spies:
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its file
            spy.wait(30)
    idle_before = cpu_seconds(procs)
    time.sleep(min(wall, 5.0))
    idle = {k: (v - idle_before[k]) * wall / min(wall, 5.0)
            for k, v in cpu_seconds(procs).items()}
    return {name: max(0.0, after[name] - before[name] - idle[name]) * 1000 / requests
            for name in procs} | {"wall_ms": wall * 1000 / requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--profile", type=Path, help="write py-spy profiles here")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                        help="the coordinator's and node's event loop (MESHGATE_LOOP)")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    env = {"MESHGATE_LOOP": args.loop} if args.loop != "asyncio" else None
    with tempfile.TemporaryDirectory(prefix="mg-cpu-") as tmp:
        root = Path(tmp)
        mesh = Mesh(root=root, api_port=free_port(), tunnel_port=free_port())
        fake, upstream = start_fake_upstream(root, args.chunks)
        try:
            mesh.start_coordinator(env=env)
            mesh.key = mesh.make_key("bench")
            if mesh.enroll("node-a").returncode:
                raise SystemExit("enroll failed")
            mesh.start_node("node-a", extra=("--upstream", f"{MODEL}={upstream}"), env=env)
            mesh.wait_serving(MODEL)
            assert mesh.coordinator is not None
            procs = {
                "coordinator": psutil.Process(mesh.coordinator.popen.pid),
                "node": psutil.Process(mesh.nodes["node-a"].popen.pid),
                "upstream": psutil.Process(fake.pid),
            }
            client = httpx.Client(timeout=60, headers={"Authorization": f"Bearer {mesh.key}"})
            url = f"{mesh.api}/chat/completions"
            body: dict[str, Any] = {"model": MODEL, "max_tokens": 16, "temperature": 0,
                                    "messages": [{"role": "user", "content": "Say hello."}]}
            rows = []
            for shape, shaped in (("non-stream", body), ("stream", {**body, "stream": True})):
                for _ in range(args.warmup):
                    one_request(client, url, shaped)
                rows.append((shape, run_shape(client, url, shaped, args.requests, procs,
                                              args.profile, shape, args.rate)))
        finally:
            mesh.stop()
            fake.kill()
    print(f"CPU ms per request through the coordinator ({args.requests} requests, one at a "
          f"time, instant fake upstream, {args.chunks} chunks a stream, loop {args.loop})")
    print(f"{'shape':<12}{'coordinator':>13}{'node':>8}{'upstream':>10}{'wall':>8}")
    for shape, row in rows:
        print(f"{shape:<12}{row['coordinator']:>13.3f}{row['node']:>8.3f}{row['upstream']:>10.3f}"
              f"{row['wall_ms']:>8.3f}")


if __name__ == "__main__":
    main()
