"""Python calls per request of the coordinator and the node, by place, non-stream and stream.

    .venv/bin/python scripts/bench/request_calls.py [--requests 200] [--chunks 16]
        [--against DIR] [--top 30] [--only coordinator|node]

The same processes as request_cpu.py (a real coordinator and an enrolled node, loopback
websockets tunnel, SQLite store, the instant FAKE OpenAI upstream of the tests), each
started with ``scripts/bench/calls_hook`` on its path: SIGUSR1 starts a cProfile of its
main thread, SIGUSR2 writes it. After a warm-up, each shape's ``--requests`` requests are
sent one at a time between the two signals, and the figure is Python calls per request
(functions and builtins, counted by cProfile) per process: a count that repeats from run
to run where CPU times on a shared box do not. Also the calls that make an asyncio task
or future, or schedule a callback, per request (``create_task``, ``create_future``,
``call_soon``...: the hand-offs a request pays for), and the functions called most.

Not counted: threads other than the main one (the ledger's SQLite writer thread, to_thread
work), and what C code does without calling Python (uvloop's own I/O, httptools' parser).

``--against DIR`` starts a second coordinator and node running DIR's code (as overhead.py)
and prints both.
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.overhead import (  # noqa: E402
    MODEL,
    against_env,
    one_request,
    start_fake_upstream,
    start_pair,
)
from tests.e2e.mesh import wait_until  # noqa: E402

HOOK = Path(__file__).resolve().parent / "calls_hook"
#: Calls that hand work to the loop (a task, a future, a callback, a timer).
HANDOFFS = ("create_task", "create_future", "call_soon", "call_later", "call_at",
            "ensure_future", "run_in_executor", "to_thread", "wait_for", "shield", "gather")


def place(file: str, roots: list[str]) -> str:
    for lib in ("starlette", "fastapi", "uvicorn", "httpx", "httpcore", "h11", "anyio",
                "websockets", "msgspec", "sqlite3", "asyncio", "logging", "prometheus_client",
                "pydantic", "json", "contextvars", "cryptography", "zstandard"):
        if f"/{lib}/" in file or file.endswith(f"/{lib}.py"):
            return lib
    if "/site-packages/" in file:
        return "other libraries"
    for root in roots:
        if file.startswith(root + "/"):
            rel = file.removeprefix(root + "/")
            top = rel.split("/")[0]
            return rel if top in ("coordinator", "node_agent", "tunnel") else top
    if file == "~":
        return "builtins"
    return "stdlib"


def summarize(path: Path, requests: int, roots: list[str]) -> dict[str, Any]:
    stats: dict[Any, Any] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    groups: collections.Counter[str] = collections.Counter()
    handoffs: collections.Counter[str] = collections.Counter()
    rows = []
    total = 0
    for (file, line, name), (_, calls, own, _, _) in stats.items():
        total += calls
        groups[place(file, roots)] += calls
        for word in HANDOFFS:
            if name == word or f"'{word}'" in name or name.endswith(f".{word}>"):
                handoffs[word] += calls
        where = file
        for root in roots:
            where = where.removeprefix(root + "/")
        rows.append((calls / requests, own / requests * 1e6, f"{where}:{line}({name})"))
    rows.sort(key=lambda row: -row[0])
    return {"calls": total / requests,
            "groups": [(g, n / requests) for g, n in groups.most_common()],
            "handoffs": {k: round(v / requests, 2) for k, v in handoffs.most_common()},
            "top": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--against", type=Path, metavar="DIR")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--by-cpu", action="store_true",
                        help="also list the functions by their own CPU time")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="copy the profiles here (SHAPE-PROCESS.prof, for pstats)")
    parser.add_argument("--only", choices=["coordinator", "node"])
    parser.add_argument("--shape", choices=["non-stream", "stream"], action="append")
    args = parser.parse_args()
    shapes = args.shape or ["non-stream", "stream"]
    with tempfile.TemporaryDirectory(prefix="mg-calls-") as tmp:
        root = Path(tmp)
        fake, upstream = start_fake_upstream(root, args.chunks)
        cleanup: list[Callable[[], None]] = [fake.kill]
        pairs: dict[str, tuple[Path, dict[str, str]]] = {"": (ROOT, {})}
        if args.against:
            pairs["-b"] = (args.against.resolve(), against_env(args.against, []))
        try:
            pids: dict[str, int] = {}
            targets: list[tuple[httpx.Client, str]] = []
            folders: dict[str, Path] = {}
            for suffix, (_, env) in pairs.items():
                folder = root / f"prof{suffix or '-a'}"
                folder.mkdir()
                path = os.pathsep.join([str(HOOK), *filter(None, [env.get("PYTHONPATH")])])
                pair_env = env | {"PYTHONPATH": path, "MESHGATE_CALLS_DIR": str(folder)}
                mesh = start_pair(root / f"pair{suffix or '-a'}",
                                  ("--upstream", f"{MODEL}={upstream}"), cleanup, pair_env)
                assert mesh.coordinator is not None
                for name, proc in (("coordinator", mesh.coordinator.popen),
                                   ("node", mesh.nodes["node-a"].popen)):
                    if args.only in (None, name):
                        pids[name + suffix] = proc.pid
                        folders[name + suffix] = folder
                targets.append((httpx.Client(
                    timeout=60, headers={"Authorization": f"Bearer {mesh.key}"}),
                    f"{mesh.api}/chat/completions"))
            body: dict[str, Any] = {"model": MODEL, "max_tokens": 16, "temperature": 0,
                                    "messages": [{"role": "user", "content": "Say hello."}]}
            results: dict[str, dict[str, dict[str, Any]]] = {}
            for shape in shapes:
                shaped = body if shape == "non-stream" else {**body, "stream": True}
                for _ in range(args.warmup):
                    for client, url in targets:
                        one_request(client, url, shaped)
                for folder in set(folders.values()):
                    for old in folder.glob("*.prof"):
                        old.unlink()
                files = _round(pids, folders, targets, shaped, args.requests)
                roots = [str(ROOT)] + ([str(args.against.resolve())] if args.against else [])
                results[shape] = {name: summarize(path, args.requests, roots)
                                  for name, path in files.items()}
                if args.keep:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    for name, path in files.items():
                        shutil.copy(path, args.keep / f"{shape}-{name}.prof")
        finally:
            for step in reversed(cleanup):
                step()
    print(f"Python calls per request (main thread, cProfile; {args.requests} requests a pair, "
          f"one at a time, {args.chunks} chunks a stream)"
          + (f"; -b: {args.against}" if args.against else ""))
    for shape, per_process in results.items():
        print(f"\n== {shape}: " + ", ".join(f"{name} {r['calls']:.1f}"
                                             for name, r in per_process.items()))
        for name, r in per_process.items():
            print(f"-- {name}: {r['calls']:.1f} calls a request; hand-offs {r['handoffs']}")
            print("   by place: " + ", ".join(f"{g} {n:.1f}" for g, n in r["groups"][:14]))
            for calls, own, func in r["top"][:args.top]:
                print(f"   {calls:7.2f} calls {own:7.2f} us own  {func}")
            if args.by_cpu:
                print("   by own CPU time (profiled, so inflated; for where, not how much):")
                for calls, own, func in sorted(r["top"], key=lambda row: -row[1])[:args.top]:
                    print(f"   {calls:7.2f} calls {own:7.2f} us own  {func}")
    print(f"\nload average: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores")


def _round(pids: dict[str, int], folders: dict[str, Path],
           targets: list[tuple[httpx.Client, str]], body: dict[str, Any],
           requests: int) -> dict[str, Path]:
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR1)
    time.sleep(0.5)  # each loop wakes on its signal and starts its profile
    for i in range(requests):
        turn = i % len(targets)
        for client, url in targets[turn:] + targets[:turn]:
            one_request(client, url, body)
    time.sleep(0.2)  # the last request's work after its answer (the ledger's commit)
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR2)
    files = {name: folders[name] / f"{pid}.prof" for name, pid in pids.items()}
    wait_until(lambda: all(f.exists() and f.stat().st_size for f in files.values()), 30,
               "profiles written")
    time.sleep(0.3)  # written whole
    return files


if __name__ == "__main__":
    main()
