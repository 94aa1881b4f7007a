"""CPU time per request of each process on the coordinator path, and where it goes.

    .venv/bin/python scripts/bench/request_cpu.py [--requests 400] [--chunks 16]
        [--profile DIR] [--loop uvloop] [--against DIR] [--against-env NAME=VALUE] [--syscalls]

Starts a real coordinator and a real enrolled node (subprocesses, loopback
websockets tunnel, SQLite store) in front of the instant FAKE OpenAI upstream of
the tests (``tests/node/fake_openai_server.py``: canned words, no model), then
sends the same chat request through the coordinator ``--requests`` times one
after another, non-streaming and then streamed (``--chunks`` chunks), and reads
each process's user+system CPU time (psutil) before and after. Idle CPU (the
node's telemetry, the tunnel's pings) is measured over the same wall time with
no request and taken off, so the figure is what one request costs each process.

``--against DIR`` / ``--against-env NAME=VALUE`` (as in overhead.py) start a second
coordinator and node (another checkout's code, or other environment variables) and send
each request to both pairs in turn, the first pair first on even rounds: the two columns
of a process are then measured over the same seconds of the same box (before/after).

``--syscalls`` then sends each shape's requests once more with ``strace -f -c`` attached to
every process and prints the system calls per request of each (reads, writes, waits on
epoll, futex wake-ups): how many times a request crosses the kernel and wakes a process
(strace slows what it traces, so these rounds give no CPU figures).

Wall time on a shared box says little; CPU time per process says which process
pays and does not move with the neighbours' load (it does with the CPU's clock:
compare figures from one run, or runs on the same quiet box). With ``--profile
DIR`` py-spy (``pip install py-spy``) samples the coordinator and the node at a
high rate during the timed requests and writes a speedscope file per process and
shape to DIR (open it on https://www.speedscope.app, or read ``--format raw``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.overhead import (  # noqa: E402
    MODEL,
    against_env,
    one_request,
    start_fake_upstream,
    start_pair,
)


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


Target = tuple[str, httpx.Client, str]
"""(name, client with the pair's key, chat completions URL)"""


def run_shape(targets: list[Target], body: dict[str, Any], requests: int,
              procs: dict[str, psutil.Process], profile: Path | None, shape: str,
              rate: int) -> dict[str, float]:
    """CPU ms per request for each process (idle CPU over the same wall time taken off),
    each request sent to every target in turn (the order turning every round)."""
    spies = [profiled(p.pid, profile / f"{shape}-{name}.json" if profile else None, rate)
             for name, p in procs.items() if name != "upstream"]
    time.sleep(1.0 if profile else 0)  # py-spy attaches
    before = cpu_seconds(procs)
    started = time.perf_counter()
    for i in range(requests):
        turn = i % len(targets)
        for _, client, url in targets[turn:] + targets[:turn]:
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
    per_request = {name: max(0.0, after[name] - before[name] - idle[name]) * 1000 / requests
                   for name in procs if name != "upstream"}
    upstream = max(0.0, after["upstream"] - before["upstream"] - idle["upstream"])
    return per_request | {"upstream": upstream * 1000 / (requests * len(targets)),
                          "wall_ms": wall * 1000 / (requests * len(targets))}


#: The system calls --syscalls prints (others are summed as "other").
SYSCALLS = ("read", "recvfrom", "recvmsg", "write", "writev", "sendto", "sendmsg",
            "epoll_wait", "epoll_pwait", "futex", "pwrite64")


def traced(procs: dict[str, psutil.Process], targets: list[Target], body: dict[str, Any],
           requests: int, folder: Path) -> dict[str, dict[str, float]]:
    """System calls per request of each process (`strace -c -f`) over `requests` requests
    sent to every target in turn."""
    strace = shutil.which("strace")
    if strace is None:
        raise SystemExit("--syscalls needs strace (apt-get install strace)")
    tracers = {name: subprocess.Popen(
        [strace, "-f", "-c", "-o", str(folder / f"{name}.txt"), "-p", str(proc.pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, proc in procs.items()}
    time.sleep(1.0)  # strace attaches to every thread
    for i in range(requests):
        turn = i % len(targets)
        for _, client, url in targets[turn:] + targets[:turn]:
            one_request(client, url, body)
    for tracer in tracers.values():
        tracer.send_signal(2)  # SIGINT: strace detaches and writes its summary
        tracer.wait(30)
    out: dict[str, dict[str, float]] = {}
    for name in procs:
        share = requests * (len(targets) if name == "upstream" else 1)
        counts = dict.fromkeys((*SYSCALLS, "other"), 0.0)
        for line in (folder / f"{name}.txt").read_text().splitlines():
            fields = line.split()
            if len(fields) < 5 or not fields[3].isdigit() or fields[-1] == "total":
                continue
            key = fields[-1] if fields[-1] in SYSCALLS else "other"
            counts[key] += int(fields[3]) / share
        out[name] = counts
    return out


def print_syscalls(shape: str, counts: dict[str, dict[str, float]]) -> None:
    shown = [c for c in (*SYSCALLS, "other") if any(row[c] for row in counts.values())]
    print(f"system calls per request, {shape} (strace -c -f)")
    print(f"{'process':<16}" + "".join(f"{c:>12}" for c in shown))
    for name, row in counts.items():
        print(f"{name:<16}" + "".join(f"{row[c]:>12.2f}" for c in shown))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--profile", type=Path, help="write py-spy profiles here")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"],
                        help="the coordinator's and node's event loop (MESHGATE_LOOP; "
                             "default: each daemon's own)")
    parser.add_argument("--against", type=Path, metavar="DIR",
                        help="a second coordinator and node run this checkout's code")
    parser.add_argument("--against-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of the second coordinator and node only")
    parser.add_argument("--syscalls", action="store_true",
                        help="then count each process's system calls per request (strace)")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    env = {"MESHGATE_LOOP": args.loop} if args.loop else {}
    pairs = {"": env}
    if args.against or args.against_env:
        pairs["-b"] = env | against_env(args.against, args.against_env)
    with tempfile.TemporaryDirectory(prefix="mg-cpu-") as tmp:
        root = Path(tmp)
        fake, upstream = start_fake_upstream(root, args.chunks)
        cleanup: list[Callable[[], None]] = [fake.kill]
        try:
            procs = {"upstream": psutil.Process(fake.pid)}
            targets: list[Target] = []
            for suffix, pair_env in pairs.items():
                mesh = start_pair(root / f"pair{suffix or '-a'}", ("--upstream",
                                  f"{MODEL}={upstream}"), cleanup, pair_env)
                assert mesh.coordinator is not None
                procs[f"coordinator{suffix}"] = psutil.Process(mesh.coordinator.popen.pid)
                procs[f"node{suffix}"] = psutil.Process(mesh.nodes["node-a"].popen.pid)
                targets.append((suffix, httpx.Client(
                    timeout=60, headers={"Authorization": f"Bearer {mesh.key}"}),
                    f"{mesh.api}/chat/completions"))
            body: dict[str, Any] = {"model": MODEL, "max_tokens": 16, "temperature": 0,
                                    "messages": [{"role": "user", "content": "Say hello."}]}
            rows = []
            syscalls: list[tuple[str, dict[str, dict[str, float]]]] = []
            for shape, shaped in (("non-stream", body), ("stream", {**body, "stream": True})):
                for _ in range(args.warmup):
                    for _, client, url in targets:
                        one_request(client, url, shaped)
                rows.append((shape, run_shape(targets, shaped, args.requests, procs,
                                              args.profile, shape, args.rate)))
                if args.syscalls:
                    folder = root / f"strace-{shape}"
                    folder.mkdir()
                    syscalls.append((shape, traced(procs, targets, shaped, args.requests,
                                                   folder)))
        finally:
            for step in reversed(cleanup):
                step()
    columns = [name for name in procs if name != "upstream"] + ["upstream", "wall_ms"]
    print(f"CPU ms per request ({args.requests} requests a pair, one at a time, instant fake "
          f"upstream, {args.chunks} chunks a stream, loop {args.loop or 'default'}; wall_ms: "
          f"per request, all pairs)")
    if len(pairs) > 1:
        print(f"-b: {args.against or 'this checkout'} with "
              f"{' '.join(args.against_env) or 'the same environment'}")
    print(f"{'shape':<12}" + "".join(f"{c:>15}" for c in columns))
    for shape, row in rows:
        print(f"{shape:<12}" + "".join(f"{row[c]:>15.3f}" for c in columns))
    for shape, counts in syscalls:
        print_syscalls(shape, counts)
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
