"""Where one non-stream request's time goes: a timeline across the client, coordinator,
node and upstream processes.

    .venv/bin/python scripts/bench/timeline.py [--requests 300] [--warmup 50] [--against DIR]

Starts the processes of overhead.py (the instant FAKE OpenAI upstream of the tests, a
real coordinator and an enrolled node over the loopback websockets tunnel, SQLite store),
each with ``scripts/bench/timeline_hook`` on its path: a few functions of each process
note ``time.monotonic_ns()`` (one clock for the whole box) as they run. Requests are sent
one at a time, to the coordinator and straight to the upstream in turn (and to a second
coordinator and node running another checkout's code, ``--against DIR``, the order turning
every round); for each stamp the
median time since the client began its request, and the median gap from the stamp before
it (each request's own gaps, then the median: not a difference of medians). A gap between
two processes is the wake-up of the second and the loopback hop.

Stamps (process.label; ``<``/``>``: a call's start and end), in the order a request meets
them:

- client: ``wrote`` (httpcore wrote to the socket: head, then body), ``read`` (it read
  from the socket), ``done`` (``post`` returned); each window starts before ``post``;
- coordinator: ``http.read``/``uv.read`` (its HTTP protocol got bytes), ``uv.headers``
  (uvicorn's head callback: the scope, the request's task made), ``serve_hot`` (the task
  runs, below ASGI), ``handle`` (the route), ``body`` (waiting for the body), ``parsed``,
  ``plan``, ``for_key``, ``from_cache``, ``deadline_of``, ``dispatch`` (the dispatcher
  starts), ``schedule``, ``try_node``, ``open`` (tunnel stream opened: OPEN queued),
  ``kick``/``write_round``/``core.data_to_send``/``ws.write`` (the tunnel's writer asked,
  its loop callback, the core's encryption, a websocket message written), ``recv`` (the
  first frame awaited), then ``ws.read``/``on_message``/``core.receive_lone``/
  ``mux.dispatch``/``deliver`` (the answer's bytes in, decrypted, handed to the stream),
  ``whole`` (the body collected and its row stored), ``ledger``/``sql.insert`` (the row:
  ``commit_now``; SQLite's INSERT and COMMIT), ``JsonAnswer``, ``respond`` (head and body
  written);
- node: ``ws.read``, ``on_message``, ``core.receive_lone``, ``mux.dispatch``,
  ``mux.accept`` (the stream and its task made), ``serve`` (the task runs), ``answer``,
  ``up.request`` (its HTTP/1.1 client sends to the upstream and waits for the head),
  ``up.read`` (the upstream's bytes in), ``send_last`` (the answer and END framed as one),
  ``kick``/``write_round``/``core.data_to_send``/``ws.write``;
- upstream (uvicorn): ``uv.read``, ``uv.headers``, ``uv.write`` (the body sent).

A write's stamp (``ws.write``, ``uv.write``, the client's ``wrote``) is taken once the
write returned: a write that wakes another process may let that one run first (two cores,
four processes), so it can come after the other process's first stamps (a negative gap).
The first stamp of each label within a request's window counts (a telemetry frame in a
window moves a few samples; medians take little notice). A stamp costs ~0.2 us.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpcore._backends.sync as httpcore_sync
import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.overhead import (  # noqa: E402
    MODEL,
    against_env,
    start_fake_upstream,
    start_pair,
)
from tests.e2e.mesh import wait_until  # noqa: E402

HOOK = Path(__file__).resolve().parent / "timeline_hook"
_client: list[tuple[str, int]] = []


def _hook_client() -> None:
    """Stamp httpcore's socket writes and reads in this process."""
    stream = httpcore_sync.SyncStream
    write, read = stream.write, stream.read

    def stamped_write(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = write(self, *args, **kwargs)
        _client.append(("wrote", time.monotonic_ns()))
        return result

    def stamped_read(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = read(self, *args, **kwargs)
        _client.append(("read", time.monotonic_ns()))
        return result

    stream.write, stream.read = stamped_write, stamped_read  # type: ignore[method-assign]


def firsts(windows: list[tuple[int, int]], stamps: list[tuple[str, int]]
           ) -> list[dict[str, int]]:
    """For each window: the first stamp of each label in it (ns since the window began)."""
    stamps = sorted(stamps, key=lambda s: s[1])
    out: list[dict[str, int]] = []
    i = 0
    for begin, end in windows:
        while i < len(stamps) and stamps[i][1] < begin:
            i += 1
        seen: dict[str, int] = {}
        j = i
        while j < len(stamps) and stamps[j][1] <= end:
            seen.setdefault(stamps[j][0], stamps[j][1] - begin)
            j += 1
        out.append(seen)
    return out


def timeline(windows: list[tuple[int, int]], stamps: list[tuple[str, int]]
             ) -> list[tuple[str, float, float, int]]:
    """(label, median us since the window began, median us since the stamp before it in
    the same request, requests that had it) for each label, in order of time."""
    seens = firsts(windows, stamps)
    labels = {label for seen in seens for label in seen}
    order = sorted(labels, key=lambda lb: statistics.median(s[lb] for s in seens if lb in s))
    gaps: dict[str, list[int]] = {label: [] for label in order}
    for seen in seens:
        present = [lb for lb in order if lb in seen]
        previous = 0
        for label in present:
            gaps[label].append(seen[label] - previous)
            previous = seen[label]
    rows = []
    for label in order:
        at = [s[label] for s in seens if label in s]
        rows.append((label, statistics.median(at) / 1000, statistics.median(gaps[label]) / 1000,
                     len(at)))
    return rows


def print_table(name: str, spans: list[tuple[int, int]], rows: list[tuple[str, float, float,
                int]]) -> None:
    total = statistics.median((e - b) / 1000 for b, e in spans)
    print(f"\n{name}: {len(spans)} requests, median {total:.0f} us (client send to done)")
    print(f"{'stamp':<30}{'at us':>10}{'gap us':>10}{'n':>6}")
    for label, at, gap, n in rows:
        print(f"{label:<30}{at:>10.0f}{gap:>10.0f}{n:>6}")


def print_paired(a: list[tuple[str, float, float, int]],
                 b: list[tuple[str, float, float, int]]) -> None:
    """The two coordinators' stamps side by side (median us since the request began)."""
    at_b = {label: at for label, at, _, _ in b}
    print(f"\n{'stamp':<30}{'coordinator':>12}{'-b':>8}{'b - a':>8}")
    for label, at, _, _ in a:
        if label in at_b:
            print(f"{label:<30}{at:>12.0f}{at_b[label]:>8.0f}{at_b[label] - at:>8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--json", type=Path, help="also write the tables here")
    parser.add_argument("--raw", type=Path, metavar="FILE",
                        help="also write every request's stamps here (per path: a list of "
                             "{label: ns since the request began} maps, the first of each)")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="also print every stamp of N requests of each path")
    parser.add_argument("--against", type=Path, metavar="DIR",
                        help="a second coordinator and node run this checkout's code (path "
                             "coordinator-b, in the same rounds; its table beside the first)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mg-timeline-") as tmp:
        root = Path(tmp)
        folder = root / "stamps"
        folder.mkdir()
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(HOOK), *filter(None, [os.environ.get("PYTHONPATH")])])
        os.environ["MESHGATE_TIMELINE_DIR"] = str(folder)
        cleanup: list[Callable[[], None]] = []
        try:
            fake, upstream = start_fake_upstream(root, 16)
            cleanup.append(fake.kill)
            groups = {fake.pid: "upstream"}  # pid -> whose stamps
            targets: dict[str, tuple[httpx.Client, str]] = {}
            pairs: dict[str, dict[str, str] | None] = {"coordinator": None}
            if args.against:
                env = against_env(args.against, [])
                env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(HOOK)])
                pairs["coordinator-b"] = env
            for name, env in pairs.items():
                mesh = start_pair(root / name, ("--upstream", f"{MODEL}={upstream}"), cleanup,
                                  env)
                assert mesh.coordinator is not None
                groups[mesh.coordinator.popen.pid] = groups[
                    mesh.nodes["node-a"].popen.pid] = name
                targets[name] = (httpx.Client(timeout=60, headers={
                    "Authorization": f"Bearer {mesh.key}"}), mesh.api)
            targets["direct"] = (httpx.Client(timeout=60), upstream)
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
                    "max_tokens": 16, "temperature": 0}
            _hook_client()
            windows: dict[str, list[tuple[int, int]]] = {name: [] for name in targets}
            names = list(targets)
            for i in range(args.warmup + args.requests):
                if i == args.warmup:
                    for pid in groups:
                        os.kill(pid, signal.SIGUSR1)
                    time.sleep(0.2)
                    _client.clear()
                turn = i % len(names)  # the order turning every round
                for name in names[turn:] + names[:turn]:
                    client, base = targets[name]
                    began = time.monotonic_ns()
                    reply = client.post(f"{base}/chat/completions", json=body)
                    ended = time.monotonic_ns()
                    reply.raise_for_status()
                    if i >= args.warmup:
                        windows[name].append((began, ended))
                        _client.append(("done", ended))
            for pid in groups:
                os.kill(pid, signal.SIGUSR2)
            wait_until(lambda: len(list(folder.glob("*.json"))) == len(groups), 30, "stamps")
            shared: list[tuple[str, int]] = [("client." + lb, t) for lb, t in _client]
            own: dict[str, list[tuple[str, int]]] = {name: [] for name in pairs}
            for path in folder.glob("*.json"):
                dumped = json.loads(path.read_text())
                group = groups[int(path.stem)]
                stamped = [(f"{dumped['role']}.{lb}", t) for lb, t in dumped["stamps"]]
                (shared if group == "upstream" else own[group]).extend(stamped)
        finally:
            for step in reversed(cleanup):
                step()
    out: dict[str, Any] = {}
    for name, spans in windows.items():
        # straight to the upstream: the client's and the upstream's own (the coordinators
        # and nodes may still finish a request before)
        rows = out[name] = timeline(spans, shared + own.get(name, []))
        print_table(name, spans, rows)
        for begin, end in spans[len(spans) // 2:len(spans) // 2 + args.show]:
            print(f"\n{name}: one request, every stamp (us since its start)")
            for label, t in sorted((s for s in shared + own.get(name, [])
                                    if begin <= s[1] <= end), key=lambda s: s[1]):
                print(f"  {(t - begin) / 1000:>8.0f}  {label}")
    if args.raw:
        args.raw.write_text(json.dumps({name: firsts(spans, shared + own.get(name, []))
                                        for name, spans in windows.items()}))
    if "coordinator-b" in out:
        print_paired(out["coordinator"], out["coordinator-b"])
        print(f"coordinator-b: {args.against}")
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
