"""Many concurrent streamed answers through coordinator + tunnel, against the upstream alone.

    .venv/bin/python scripts/bench/streams.py [--streams 500] [--chunks 64] [--rounds 3]
        [--json OUT.json] [--profile DIR]

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
  shared box was then: other processes' load moves every figure.

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

from overhead import MODEL, start_fake_upstream  # noqa: E402

from tests.e2e.mesh import Mesh, free_port  # noqa: E402

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


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def profiled(pid: int, out: Path) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", "250", "--native", "--format", "raw",
         "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


async def drive(args: argparse.Namespace, mesh: Mesh, upstream_port: int,
                pids: dict[str, int]) -> dict[str, Any]:
    coordinator_pid = pids["coordinator"]
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": args.chunks,
                       "messages": [{"role": "user", "content": "Say hello."}]}).encode()
    targets: dict[str, Callable[[], Any]] = {
        "direct": lambda: round_of(args.streams, upstream_port, "/v1/chat/completions",
                                   body, ""),
        "mesh": lambda: round_of(args.streams, mesh.api_port, "/v1/chat/completions", body,
                                 f"Authorization: Bearer {mesh.key}\r\n"),
    }
    warm = await targets["mesh"]()  # connections, imports, caches: not counted
    rss = [rss_mib(coordinator_pid)]
    rounds: list[dict[str, Any]] = []
    spies = []
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        spies = [profiled(pids[name], args.profile / f"{name}.txt")
                 for name in ("coordinator", "node")]
        await asyncio.sleep(1.0)  # py-spy attaches
    for i in range(args.rounds):
        order = ["direct", "mesh"] if i % 2 == 0 else ["mesh", "direct"]
        row: dict[str, Any] = {}
        for name in order:
            before = {proc: cpu_s(pid) for proc, pid in pids.items()}
            client = time.process_time()
            row[name] = await targets[name]()
            row[name]["cpu_s"] = {proc: round(cpu_s(pid) - before[proc], 2)
                                  for proc, pid in pids.items()}
            row[name]["cpu_s"]["client"] = round(time.process_time() - client, 2)
        rss.append(rss_mib(coordinator_pid))
        row["rss_mib"] = rss[-1]
        rounds.append(row)
        print(f"round {i + 1}: direct {row['direct']['wall_s']:.2f} s "
              f"(refused {row['direct']['refused']}), mesh {row['mesh']['wall_s']:.2f} s "
              f"(refused {row['mesh']['refused']}, incomplete {row['mesh']['incomplete']}, "
              f"min events {row['mesh']['events_min']}), coordinator RSS {rss[-1]:.1f} MiB; "
              f"CPU s mesh {row['mesh']['cpu_s']}, direct {row['direct']['cpu_s']}",
              flush=True)
    for spy in spies:
        spy.send_signal(2)  # SIGINT: py-spy writes its file
        spy.wait(60)
    ratios = [r["mesh"]["wall_s"] / r["direct"]["wall_s"] for r in rounds]
    return {
        "streams": args.streams, "chunks": args.chunks, "rounds": rounds, "warmup": warm,
        "wall_ratio_median": statistics.median(ratios), "wall_ratios": ratios,
        "refused_mesh": sum(r["mesh"]["refused"] for r in rounds),
        "refused_direct": sum(r["direct"]["refused"] for r in rounds),
        "incomplete_mesh": sum(r["mesh"]["incomplete"] for r in rounds),
        "rss_after_warmup_mib": rss[0], "rss_growth_mib": rss[-1] - rss[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", type=Path, help="py-spy the coordinator and the node "
                        "over the rounds (collapsed stacks in this folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mg-streams-") as tmp:
        root = Path(tmp)
        mesh = Mesh(root=root, api_port=free_port(), tunnel_port=free_port())
        fake, upstream = start_fake_upstream(root, args.chunks)
        try:
            mesh.start_coordinator()
            mesh.key = mesh.make_key("bench")
            enrolled = mesh.enroll("node-a")
            if enrolled.returncode:
                raise SystemExit(f"enroll failed: {enrolled.stderr}")
            mesh.start_node("node-a", extra=("--upstream", f"{MODEL}={upstream}"))
            mesh.wait_serving(MODEL)
            assert mesh.coordinator is not None
            port = int(upstream.rsplit(":", 1)[1].split("/")[0])
            pids = {"coordinator": mesh.coordinator.popen.pid,
                    "node": mesh.nodes["node-a"].popen.pid, "upstream": fake.pid}
            result = asyncio.run(drive(args, mesh, port, pids))
        finally:
            mesh.stop()
            fake.kill()
    print(f"{args.streams} concurrent {args.chunks}-chunk streams, {args.rounds} rounds: "
          f"mesh/direct wall x{result['wall_ratio_median']:.2f} (median; rounds "
          + ", ".join(f"{r:.2f}" for r in result["wall_ratios"]) + "), refused "
          f"{result['refused_mesh']} (direct {result['refused_direct']}), incomplete "
          f"{result['incomplete_mesh']}, coordinator RSS {result['rss_after_warmup_mib']:.1f} "
          f"MiB after warm-up, growth {result['rss_growth_mib']:+.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
