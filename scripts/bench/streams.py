"""Many concurrent streamed answers through coordinator + tunnel, against the upstream alone.

    .venv/bin/python scripts/bench/streams.py [--streams 500] [--chunks 64] [--rounds 3]
        [--json OUT.json] [--profile DIR] [--against DIR] [--against-env NAME=VALUE]
        [--against-node-env NAME=VALUE]

Starts a real coordinator and a real enrolled node (subprocesses, loopback websocket
tunnel, SQLite store, default settings) in front of the FAKE instant OpenAI upstream of
the tests (``tests/node/fake_openai_server.py``: canned words, no model, ``--chunks``
content chunks per answer). Each round opens ``--streams`` streaming chat requests at
once, straight to the upstream ("direct") and through the coordinator ("mesh"), the two
in alternating order from round to round so that drift hits both alike, and reports:

* refused: answers that were not 200 (the coordinator's 429/503 included);
* incomplete: 200 answers without every chunk and ``[DONE]``;
* wall: seconds from the first request to the last answer's end; mesh / direct;
* the coordinator's RSS after a warm-up round and after each round (growth: MiB);
* CPU seconds each process (coordinator, node, upstream, and this client) used in each
  round: on a box with fewer free cores than busy processes the wall ratio follows the
  sum of these (two cores: the mesh's four busy processes against direct's two). The
  upstream does the same work in both, so its CPU in a round also tells how slow the
  shared box was then: other processes' load moves every figure;
* others: CPU seconds the rest of the box used meanwhile (``/proc/stat`` less ours);
* io: read and write system calls of each process in the round (``/proc/PID/io``; libuv's
  reads count, asyncio's socket ``recv`` does not): into how many pieces the work was cut.
  Rounds of the same streams are not all alike: the node's reads of the upstream
  (10,000-19,000 for 33,000 chunks) follow how often its loop came round, and with them
  every process's CPU (more reads: more frames, more writes to the client);
* pacing: the node's reads paused and ticks fired in the round, from its /metrics
  (node_agent/runtimes/read_tick.py), and the coordinator's writes held and ticks fired
  (``w_held_writes``, ``w_ticks``: coordinator/write_tick.py), from their /metrics
  (absent for a tree without them);
* a round's means at the end: coordinator and node CPU seconds, node reads, coordinator
  writes, reads paused, writes held.

Before/after in one run: ``--against DIR`` (another checkout's code), ``--against-env
NAME=VALUE`` (both processes) and ``--against-node-env NAME=VALUE`` (its node only:
``MESHGATE_LOOP=asyncio`` compares the node's loop) start a second coordinator and node
("mesh-b") on the same upstream; each round then runs direct, mesh and mesh-b, in a
rotating order, and mesh-b's wall and CPU are reported next to mesh's.

The client is a bare asyncio HTTP/1.1 writer/reader (one connection per stream,
``Connection: close``) so that its own cost stays small next to the servers'. Bounded:
every stream has a 120 s timeout, everything is on 127.0.0.1 and ephemeral ports.

With ``--profile DIR`` py-spy (``pip install py-spy``) samples the coordinator and the
node with native frames over the timed rounds (``DIR/coordinator.txt``, ``DIR/node.txt``:
collapsed stacks, one line a stack and its count; idle waits are not sampled). The
sampler takes CPU of its own: figures from a profiled run are not comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from overhead import MODEL, against_env, start_fake_upstream, start_pair  # noqa: E402

from tests.e2e.mesh import Mesh  # noqa: E402

STREAM_TIMEOUT_S = 120.0
DONE = b"data: [DONE]"


async def one_stream(port: int, path: str, body: bytes, headers: str) -> tuple[int, int, bool]:
    """(status, SSE events read, whether [DONE] ended it) for one streamed request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode() + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        data = await reader.read()  # the server closes after the answer (Connection: close)
        return status, data.count(b"data: "), DONE in data[-64:]
    finally:
        writer.close()


async def round_of(n: int, port: int, path: str, body: bytes, headers: str
                   ) -> dict[str, Any]:
    async def bounded() -> tuple[int, int, bool]:
        try:
            async with asyncio.timeout(STREAM_TIMEOUT_S):
                return await one_stream(port, path, body, headers)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            return 0, 0, False

    started = time.perf_counter()
    results = await asyncio.gather(*(bounded() for _ in range(n)))
    wall = time.perf_counter() - started
    ok = [r for r in results if r[0] == 200]
    return {
        "wall_s": wall,
        "refused": n - len(ok),
        "statuses": sorted({r[0] for r in results if r[0] != 200}),
        "events_min": min((r[1] for r in ok), default=0),
        "incomplete": sum(1 for r in ok if not r[2]),
    }


def cpu_s(pid: int) -> float:
    """User + system CPU seconds `pid` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy(proc: str, target: str) -> bool:
    """Whether `proc` does work for `target` ("direct": the upstream; "mesh-b": the upstream,
    coordinator-b and node-b)."""
    return proc == "upstream" or (target != "direct" and proc in (
        f"coordinator{target[4:]}", f"node{target[4:]}"))


def syscalls(pid: int) -> tuple[int, int]:
    """Read and write system calls `pid` has made."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["syscr"]), int(fields["syscw"])


def box_busy_s() -> float:
    """CPU seconds the whole box has used (user, nice, system, irq, softirq: /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def paced(mesh: Mesh) -> dict[str, float]:
    """The node's read pacing counters (node_agent/runtimes/read_tick.py) and the
    coordinator's write pacing counters (coordinator/write_tick.py: ``w_`` before their
    names) from their /metrics; {} for a tree without them (an older one)."""
    node = httpx.get(f"http://127.0.0.1:{mesh.proxy_ports['node-a']}/metrics").text
    coordinator = httpx.get(f"http://127.0.0.1:{mesh.api_port}/metrics").text
    return {**counters(node, "meshgate_node_read_pacing_", ""),
            **counters(coordinator, "meshgate_coordinator_write_pacing_", "w_")}


def counters(text: str, prefix: str, mark: str) -> dict[str, float]:
    """The counters in a /metrics `text` whose names start with `prefix`, by the rest of
    their name after `mark`."""
    return {mark + name[len(prefix):-len("_total")]: float(value) for name, _, value in
            (line.partition(" ") for line in text.splitlines())
            if name.startswith(prefix) and name.endswith("_total")}


def profiled(pid: int, out: Path) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", "250", "--native", "--format", "raw",
         "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


async def drive(args: argparse.Namespace, meshes: dict[str, Mesh], upstream_port: int,
                pids: dict[str, int]) -> dict[str, Any]:
    """The rounds; `meshes`: "mesh" (and "mesh-b"); `pids`: every process by its role."""
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": args.chunks,
                       "messages": [{"role": "user", "content": "Say hello."}]}).encode()

    def through(mesh: Mesh) -> Callable[[], Any]:
        return lambda: round_of(args.streams, mesh.api_port, "/v1/chat/completions", body,
                                f"Authorization: Bearer {mesh.key}\r\n")

    targets: dict[str, Callable[[], Any]] = {
        "direct": lambda: round_of(args.streams, upstream_port, "/v1/chat/completions",
                                   body, ""),
        **{name: through(mesh) for name, mesh in meshes.items()},
    }
    coordinators = {name: pids[f"coordinator{name[4:]}"] for name in meshes}
    warm = {name: await targets[name]() for name in meshes}  # connections, imports, caches
    rss = {name: [rss_mib(pid)] for name, pid in coordinators.items()}
    rounds: list[dict[str, Any]] = []
    spies = []
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        spies = [profiled(pids[name], args.profile / f"{name}.txt")
                 for name in ("coordinator", "node")]
        await asyncio.sleep(1.0)  # py-spy attaches
    names = list(targets)
    for i in range(args.rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        if len(names) == 2 and i % 2:
            order = order[::-1]
        row: dict[str, Any] = {}
        for name in order:
            counted = paced(meshes[name]) if name in meshes else {}
            before = {proc: cpu_s(pid) for proc, pid in pids.items()}
            io = {proc: syscalls(pid) for proc, pid in pids.items()}
            box, client = box_busy_s(), time.process_time()
            row[name] = await targets[name]()
            cpu = {proc: cpu_s(pid) - before[proc] for proc, pid in pids.items()}
            cpu["client"] = time.process_time() - client
            row[name]["io"] = {proc: [a - b for a, b in zip(syscalls(pid), io[proc],
                                                            strict=True)]
                               for proc, pid in pids.items() if busy(proc, name)}
            cpu["others"] = max(0.0, box_busy_s() - box - sum(cpu.values()))
            row[name]["cpu_s"] = {proc: round(v, 2) for proc, v in cpu.items()
                                  if name == "direct" or v >= 0.05 or proc in ("client", "others")}
            if counted:
                row[name]["paced"] = {key: int(value - counted[key])
                                      for key, value in paced(meshes[name]).items()}
        for name, pid in coordinators.items():
            rss[name].append(rss_mib(pid))
            row[name]["rss_mib"] = rss[name][-1]
        rounds.append(row)
        print(f"round {i + 1}: direct {row['direct']['wall_s']:.2f} s (refused "
              f"{row['direct']['refused']}), " + ", ".join(
                  f"{name} {row[name]['wall_s']:.2f} s "
                  f"(x{row[name]['wall_s'] / row['direct']['wall_s']:.2f}; "
                  f"refused {row[name]['refused']}, incomplete {row[name]['incomplete']}, "
                  f"min events {row[name]['events_min']}, coordinator RSS "
                  f"{row[name]['rss_mib']:.1f} MiB)" for name in meshes)
              + "; CPU s " + ", ".join(f"{name} {row[name]['cpu_s']}" for name in order)
              + "; reads, writes " + ", ".join(f"{name} {row[name]['io']}" for name in meshes)
              + "".join(f"; {name} pacing {row[name]['paced']}" for name in meshes
                        if "paced" in row[name]),
              flush=True)
    for spy in spies:
        spy.send_signal(2)  # SIGINT: py-spy writes its file
        spy.wait(60)
    result: dict[str, Any] = {"streams": args.streams, "chunks": args.chunks,
                              "rounds": rounds, "warmup": warm}
    for name in meshes:
        ratios = [r[name]["wall_s"] / r["direct"]["wall_s"] for r in rounds]
        result[name] = {
            "wall_ratio_median": statistics.median(ratios), "wall_ratios": ratios,
            "refused": sum(r[name]["refused"] for r in rounds),
            "incomplete": sum(r[name]["incomplete"] for r in rounds),
            "rss_after_warmup_mib": rss[name][0], "rss_growth_mib": rss[name][-1] - rss[name][0],
            "per_round": per_round(rounds, name),
        }
    result["refused_direct"] = sum(r["direct"]["refused"] for r in rounds)
    return result


def per_round(rounds: list[dict[str, Any]], name: str) -> dict[str, float]:
    """`name`'s means a round: its coordinator's and node's CPU seconds, the node's reads
    (of the upstream) and the coordinator's writes (to the clients), reads paused."""
    suffix = name[4:]
    out = {
        "coordinator_cpu_s": statistics.mean(r[name]["cpu_s"].get(f"coordinator{suffix}", 0.0)
                                             for r in rounds),
        "node_cpu_s": statistics.mean(r[name]["cpu_s"].get(f"node{suffix}", 0.0)
                                      for r in rounds),
        "node_reads": statistics.mean(r[name]["io"][f"node{suffix}"][0] for r in rounds),
        "coordinator_writes": statistics.mean(r[name]["io"][f"coordinator{suffix}"][1]
                                              for r in rounds),
    }
    for key in ("paused_reads", "w_held_writes"):
        if all(key in r[name].get("paced", {}) for r in rounds):
            out[key] = statistics.mean(r[name]["paced"][key] for r in rounds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", type=Path, help="py-spy the coordinator and the node "
                        "over the rounds (collapsed stacks in this folder)")
    parser.add_argument("--against", type=Path, metavar="DIR",
                        help="a second coordinator and node (mesh-b) run DIR's code")
    parser.add_argument("--against-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of mesh-b's coordinator and node")
    parser.add_argument("--against-node-env", action="append", default=[],
                        metavar="NAME=VALUE", help="environment of mesh-b's node only")
    args = parser.parse_args()
    second = bool(args.against or args.against_env or args.against_node_env)
    env_b = against_env(args.against, args.against_env) if second else {}
    node_env_b = env_b | against_env(None, args.against_node_env)
    with tempfile.TemporaryDirectory(prefix="mg-streams-") as tmp:
        root = Path(tmp)
        cleanup: list[Callable[[], None]] = []
        try:
            fake, upstream = start_fake_upstream(root, args.chunks)
            cleanup.append(fake.kill)
            node_args = ("--upstream", f"{MODEL}={upstream}")
            meshes = {"mesh": start_pair(root / "a", node_args, cleanup)}
            if second:
                meshes["mesh-b"] = start_pair(root / "b", node_args, cleanup, env_b,
                                              node_env=node_env_b)
            port = int(upstream.rsplit(":", 1)[1].split("/")[0])
            pids = {"upstream": fake.pid}
            for name, mesh in meshes.items():
                assert mesh.coordinator is not None
                pids[f"coordinator{name[4:]}"] = mesh.coordinator.popen.pid
                pids[f"node{name[4:]}"] = mesh.nodes["node-a"].popen.pid
            result = asyncio.run(drive(args, meshes, port, pids))
        finally:
            for step in reversed(cleanup):
                step()
    if second:
        print(f"mesh-b: {args.against or 'this checkout'} with "
              f"{' '.join(args.against_env + args.against_node_env) or 'the same environment'}")
    for name in meshes:
        got = result[name]
        print(f"{name}: {args.streams} concurrent {args.chunks}-chunk streams, {args.rounds} "
              f"rounds: wall x{got['wall_ratio_median']:.2f} direct's (median; rounds "
              + ", ".join(f"{r:.2f}" for r in got["wall_ratios"]) + f"), refused "
              f"{got['refused']} (direct {result['refused_direct']}), incomplete "
              f"{got['incomplete']}, coordinator RSS {got['rss_after_warmup_mib']:.1f} MiB "
              f"after warm-up, growth {got['rss_growth_mib']:+.1f} MiB; a round: "
              + ", ".join(f"{key} {value:.2f}" if key.endswith("_s") else f"{key} {value:.0f}"
                          for key, value in got["per_round"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
