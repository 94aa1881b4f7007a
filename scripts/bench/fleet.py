"""One coordinator, a simulated fleet of N nodes on the real tunnel, load through the public API.

    .venv/bin/python scripts/bench/fleet.py --nodes 1000 [--procs 4] [--concurrency 32]
                                            [--nodes 10,1000 --rounds 2: sizes interleaved]
                                            [--seconds 15] [--idle-seconds 8] [--seed 1]
                                            [--nice 10] [--telemetry-period 1.0] [--profile DIR]
                                            [--keep-state]

- A real `meshgate-coordinator serve` process (SQLite in a temporary state dir).
- N identities enrolled with one reusable fleet token (`create_token(uses=N)`,
  redeemed in the store before the coordinator starts), then connected by
  `--procs` simulator processes over the real tunnel (Noise handshake,
  encrypted frames, zstd): all from 127.0.0.1, so the handshake rate limit
  for known identities is exercised too (`connect_s`, `connect_retries`).
- Each simulated node has its own hardware (GPUs or none, VRAM, RAM), 2-4
  models from a catalog (one popular model everywhere), its own speed; it
  sends the typed inventory, then telemetry at 1 Hz (jittered), and answers
  each request after its own synthetic time (4 tokens at its decode rate)
  with a chat completion whose body says that time (`sim_service_s`).
- Idle phase: coordinator CPU with only telemetry flowing (`telemetry_cpu_pct`).
- Load phase: `--concurrency` clients send non-stream chat requests for the
  popular model for `--seconds`: requests/s, latency, and added latency
  (client latency minus the node's synthetic time), the coordinator's CPU and
  RSS, and its own scheduling histogram (`/metrics`,
  `meshgate_coordinator_schedule_seconds`): decisions/s, p50/p99 (bucket
  bounds, linearly interpolated).

On a small box the simulators compete with the coordinator for the CPU:
`--nice` runs them (and only them) at a lower priority, and every CPU figure
is the coordinator process's own (psutil of its pid). `--telemetry-period`
sends telemetry less often than 1 Hz (when the box cannot simulate 10,000
nodes at 1 Hz): `telemetry_frames_per_s` says what the coordinator really got,
and `telemetry_us_per_frame` is its idle CPU per frame, the figure to scale.
`--profile DIR` records the coordinator with py-spy (if installed) in the
idle and the load phase (`idle.txt`, `load.txt`, collapsed stacks; with
`--profile-native` C frames too, at 1,000 samples/s); the figures of a
profiled run are not the ones to quote.

Comparing two trees: consecutive runs on a shared box differ by more than most
changes, so start two runs at the same time, each from its own tree (an
exported one runs past the editable install with `python -S` and
`PYTHONPATH=TREE:SITE_PACKAGES`; the coordinator and simulators are started
the same way), and compare their `telemetry_us_per_frame`.

Prints one JSON line. Loopback only, bounded in time. The run's state folder
(/tmp/meshgate-fleet-*: store, logs) is removed at exit unless `--keep-state`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fleet_sim import POPULAR, sim_worker

from coordinator.state import StateDir
from coordinator.store import Store
from tunnel import Identity


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the driver -------------------------------------------------------------------------


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def histogram(text: str, name: str) -> tuple[list[tuple[float, float]], float]:
    buckets: list[tuple[float, float]] = []
    count = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            bound = re.search(r'le="([^"]+)"', line)
            if bound:
                buckets.append((float(bound.group(1)), float(line.rsplit(" ", 1)[1])))
        elif line.startswith(f"{name}_count"):
            count = float(line.rsplit(" ", 1)[1])
    return buckets, count


def quantile(before: list[tuple[float, float]], after: list[tuple[float, float]],
             q: float) -> float | None:
    diffs = [(b, a - dict(before).get(b, 0.0)) for b, a in after]
    total = diffs[-1][1] if diffs else 0.0
    if total <= 0:
        return None
    want, low, below = q * total, 0.0, 0.0
    for bound, cum in diffs:
        if cum >= want:
            if bound == float("inf"):
                return low
            return low + (bound - low) * (want - below) / max(cum - below, 1e-9)
        low, below = bound, cum
    return low


async def load(api: str, key: str, seconds: float, concurrency: int) -> dict[str, Any]:
    lat: list[float] = []
    added: list[float] = []
    errors: dict[str, int] = {}
    body = {"model": POPULAR, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=api, timeout=60, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        async def worker() -> None:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    reply = await client.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                took = time.perf_counter() - t0
                if reply.status_code != 200:
                    errors[str(reply.status_code)] = errors.get(str(reply.status_code), 0) + 1
                    continue
                lat.append(took)
                added.append(took - float(reply.json().get("sim_service_s", 0.0)))

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - began
    lat.sort()
    added.sort()

    def pct(xs: list[float], q: float) -> float | None:
        return round(xs[min(int(len(xs) * q), len(xs) - 1)] * 1000, 2) if xs else None

    return {"requests": len(lat), "requests_per_s": round(len(lat) / wall, 1),
            "latency_p50_ms": pct(lat, 0.5), "latency_p99_ms": pct(lat, 0.99),
            "added_latency_p50_ms": pct(added, 0.5), "added_latency_p99_ms": pct(added, 0.99),
            "errors": errors, "wall_s": round(wall, 1)}


def enroll(state: StateDir, n: int, seed: int) -> list[Identity]:
    store = Store(state.db_url)
    now = time.time()
    token_id, secret = store.create_token(3600, {"fleet": "bench"}, now, uses=n)
    identities = [Identity.generate() for _ in range(n)]
    for ident in identities:
        store.redeem_token(token_id, secret, ident.did, now)
    store.close()
    return identities


async def driver(args: argparse.Namespace, n_nodes: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="meshgate-fleet-"))
    state = StateDir(root / "coordinator")
    t0 = time.perf_counter()
    identities = enroll(state, n_nodes, args.seed)
    enroll_s = time.perf_counter() - t0
    store = Store(state.db_url)
    _, api_key = store.create_key("bench", time.time())
    store.close()
    api_port, tunnel_port = free_port(), free_port()
    # `python -S` with PYTHONPATH=TREE:SITE_PACKAGES runs another tree (an exported one, to
    # compare) past the editable install: the children are started the same way
    site = ["-S"] if sys.flags.no_site else []
    exe = Path(sys.executable).with_name("meshgate-coordinator")
    cmd = [str(exe)] if exe.exists() and not site else [
        sys.executable, *site, "-c", "from coordinator.cli import app; app()"]
    coord = subprocess.Popen(  # noqa: ASYNC220
        [*cmd, "serve", "--state-dir", str(state.path), "--api-host", "127.0.0.1",
         "--api-port", str(api_port), "--tunnel-host", "127.0.0.1", "--tunnel-port",
         str(tunnel_port), "--log-level", "warning"],
        stdout=(root / "coordinator.log").open("wb"), stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{api_port}"
    workers: list[subprocess.Popen[bytes]] = []
    try:
        async with httpx.AsyncClient(base_url=api, timeout=5) as http:
            for _ in range(200):
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            proc = psutil.Process(coord.pid)
            key = state.static_public().hex()
            url = f"ws://127.0.0.1:{tunnel_port}"
            per = -(-n_nodes // args.procs)
            connect_start = time.perf_counter()
            for i in range(args.procs):
                chunk = identities[i * per:(i + 1) * per]
                spec = root / f"sim{i}.json"
                spec.write_text(json.dumps({
                    "url": url, "key": key, "seed": args.seed + i, "stats": str(root / f"s{i}"),
                    "period": args.telemetry_period,
                    "identities": [x.to_bytes().hex() for x in chunk]}))
                workers.append(subprocess.Popen(  # noqa: ASYNC220
                    ["nice", "-n", str(args.nice), sys.executable, *site, __file__, "--sim-worker",
                     str(spec)],
                    stdout=(root / f"sim{i}.log").open("wb"), stderr=subprocess.STDOUT))
            deadline = time.perf_counter() + args.connect_timeout
            nodes = 0
            while time.perf_counter() < deadline:
                nodes = (await http.get("/healthz")).json().get("nodes", 0)
                if nodes >= n_nodes:
                    break
                await asyncio.sleep(0.5)
            connect_s = time.perf_counter() - connect_start
            # every node past its first telemetry (a long period: a baseline with almost none)
            await asyncio.sleep(2.0 + min(args.telemetry_period, 10.0))
            spy = profile(args.profile, coord.pid, "idle", args.idle_seconds, args.profile_native)
            f0, c0, w0 = sent(root, args.procs), cpu_seconds(proc), time.perf_counter()
            await asyncio.sleep(args.idle_seconds)
            idle_wall = time.perf_counter() - w0
            idle_cpu = (cpu_seconds(proc) - c0) / idle_wall * 100
            frames_per_s = (sent(root, args.procs) - f0) / idle_wall
            finish(spy)
            spy = profile(args.profile, coord.pid, "load", args.seconds, args.profile_native)
            m0, _ = histogram((await http.get("/metrics")).text,
                              "meshgate_coordinator_schedule_seconds")
            _, n0 = histogram((await http.get("/metrics")).text,
                              "meshgate_coordinator_schedule_seconds")
            c1, w1 = cpu_seconds(proc), time.perf_counter()
            result = await load(api, api_key, args.seconds, args.concurrency)
            busy_cpu = (cpu_seconds(proc) - c1) / (time.perf_counter() - w1) * 100
            text = (await http.get("/metrics")).text
            m1, n1 = histogram(text, "meshgate_coordinator_schedule_seconds")
            rss = proc.memory_info().rss
            finish(spy)
        sims = [json.loads((root / f"s{i}").read_text()) for i in range(args.procs)
                if (root / f"s{i}").exists()]
        p50, p99 = quantile(m0, m1, 0.5), quantile(m0, m1, 0.99)
        return {
            "nodes": n_nodes, "connected": nodes, "procs": args.procs,
            "enroll_s": round(enroll_s, 1), "connect_s": round(connect_s, 1),
            "connect_retries": sum(s["retries"] for s in sims),
            "telemetry_period_s": args.telemetry_period,
            "telemetry_frames_per_s": round(frames_per_s, 1),
            "telemetry_cpu_pct": round(idle_cpu, 1),
            "telemetry_us_per_frame": round(idle_cpu / 100 / frames_per_s * 1e6, 1)
            if frames_per_s else None,
            "load_cpu_pct": round(busy_cpu, 1),
            "rss_mib": round(rss / 2**20, 1),
            "decisions_per_s": round((n1 - n0) / result["wall_s"], 1),
            "schedule_p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "schedule_p99_ms": None if p99 is None else round(p99 * 1000, 3),
            "concurrency": args.concurrency, **result,
            "cpu_count": os.cpu_count(),
        }
    finally:
        for w in workers:
            w.terminate()
        coord.terminate()
        for w in workers:
            w.wait(10)
        coord.wait(10)
        if not args.keep_state:  # the store, logs and specs: ~20 MB a 1,000-node run
            shutil.rmtree(root, ignore_errors=True)


def sent(root: Path, procs: int) -> int:
    """Telemetry frames the simulators have sent so far (their stats files, every 0.25 s)."""
    total = 0
    for i in range(procs):
        with contextlib.suppress(OSError, ValueError, KeyError):
            total += int(json.loads((root / f"s{i}").read_text())["telemetry"])
    return total


def profile(out: Path | None, pid: int, phase: str, seconds: float,
            native: bool = False) -> subprocess.Popen[bytes] | None:
    """py-spy on the coordinator for one phase (collapsed stacks in OUT/PHASE.txt); with
    `native`, C frames too at 1,000 samples/s (py-spy then pauses the process to sample:
    the CPU figures of such a run are off)."""
    spy = Path(sys.executable).with_name("py-spy")
    if out is None or not spy.exists():
        return None
    out.mkdir(parents=True, exist_ok=True)
    how = ["-r", "1000", "--native"] if native else ["-r", "200", "--nonblocking"]
    return subprocess.Popen([str(spy), "record", "--pid", str(pid), "-d", str(int(seconds)),
                             *how, "--format", "raw",
                             "-o", str(out / f"{phase}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finish(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        spy.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1000",
                        help="fleet size, or sizes to compare in one run: 10,1000")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with several sizes: run them interleaved this many times")
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--idle-seconds", type=float, default=8.0)
    parser.add_argument("--connect-timeout", type=float, default=240.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nice", type=int, default=10,
                        help="niceness of the simulator processes (0: same as the coordinator)")
    parser.add_argument("--telemetry-period", type=float, default=1.0)
    parser.add_argument("--profile", type=Path, help="py-spy the coordinator into this folder")
    parser.add_argument("--profile-native", action="store_true",
                        help="with --profile: C frames too, 1,000 samples/s")
    parser.add_argument("--keep-state", action="store_true",
                        help="keep the run's /tmp/meshgate-fleet-* folder (logs, store)")
    parser.add_argument("--sim-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sim_worker:
        asyncio.run(sim_worker(json.loads(args.sim_worker.read_text())))
        return
    sizes = [int(x) for x in str(args.nodes).split(",")]
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    for _ in range(args.rounds if len(sizes) > 1 else 1):
        for n in sizes:
            result = asyncio.run(driver(args, n))
            runs[n].append(result)
            print(json.dumps(result), flush=True)
    if len(sizes) > 1:  # side by side, from this one run: medians, then ratios to the first
        def median(n: int, key: str) -> float:
            return float(statistics.median(r[key] for r in runs[n]))

        base = sizes[0]
        print(json.dumps({"compare": f"each size against {base} nodes, medians of "
                          f"{args.rounds} interleaved round(s)", **{
                              f"requests_per_s_{n}_over_{base}": round(
                                  median(n, "requests_per_s") / median(base, "requests_per_s"), 3)
                              for n in sizes[1:]}, **{
                              f"telemetry_cpu_pct_{n}": median(n, "telemetry_cpu_pct")
                              for n in sizes}}))


if __name__ == "__main__":
    main()
