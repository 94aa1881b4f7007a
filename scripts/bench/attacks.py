"""Attacks from issue 9 against real daemons, with the figures the issue asks for.

    .venv/bin/python scripts/bench/attacks.py slowloris [--code DIR] [--conns 1100]
        [--hold 40] [--nofile 1024]
    .venv/bin/python scripts/bench/attacks.py ledger-kill [--code DIR] [--answers 6]
    .venv/bin/python scripts/bench/attacks.py request-id [--code DIR] [--id-bytes 4000000]
    .venv/bin/python scripts/bench/attacks.py relay-flood [--code DIR] [--relayed 300]
    .venv/bin/python scripts/bench/attacks.py ollama-body [--code DIR] [--body-mb 200]

``--code DIR`` runs the daemons from another checkout of meshgate (e.g. a
``git worktree add --detach /tmp/base <commit>`` of the code before a fix), so
the same attack measures before and after side by side; the default is this
checkout.

* ``slowloris``: a coordinator whose open-file limit is ``--nofile`` (systemd's
  default is 1,024) gets ``--conns`` connections that send one request line and
  nothing more. Every 5 s for ``--hold`` s: the latency of a normal keyed
  request (10 s timeout), how many attack connections the server still holds,
  its RSS and how many bytes its log grew.
* ``ledger-kill``: ``--answers`` requests are answered by a node (an instant
  fake node on the real tunnel library), the coordinator is SIGKILLed the
  moment the last answer is read, and the ledger is counted.
* ``request-id``: a node opens one request upward with a ``--id-bytes`` request
  id; the coordinator's log growth and its answer.
* ``relay-flood``: one node relays ``--relayed`` requests for a model whose only
  node never answers until released; then an app with a key asks for it: its
  status and latency (released after 5 s), and the ledger rows of the relayed.
* ``ollama-body``: a node (no model, not connected) gets a ``--body-mb`` MB chunked
  body on ``/api/chat``: its answer and how much its RSS grew.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
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

from tests.e2e.mesh import Mesh, free_port, wait_until  # noqa: E402


class CodeMesh(Mesh):
    """A Mesh whose daemons and CLIs run from another checkout (`code`)."""

    code: Path = ROOT
    nofile: int | None = None

    def start_coordinator(self, *extra: str, env: dict[str, str] | None = None) -> None:
        log = self.root / "coordinator.log"
        limit = self.nofile

        def limits() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        args = ["serve", "--state-dir", str(self.coord_state), "--api-host", "127.0.0.1",
                "--api-port", str(self.api_port), "--tunnel-host", "127.0.0.1",
                "--tunnel-port", str(self.tunnel_port), *extra]
        from tests.e2e.mesh import Proc
        popen = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", *args], cwd=self.code,
            stdout=log.open("wb"), stderr=subprocess.STDOUT, preexec_fn=limits,  # noqa: PLW1509
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(self.code),
                 **(env or {})})
        self.coordinator = Proc(popen, log)
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{self.api_port}/healthz").status_code
                   == 200, 30, "coordinator", [self.coordinator])

    def make_key(self, name: str) -> str:
        out = subprocess.run([sys.executable, "-m", "coordinator.cli", "key", "create",
                              "--state-dir", str(self.coord_state), "--name", name],
                             cwd=self.code, env={**os.environ, "PYTHONPATH": str(self.code)},
                             capture_output=True, text=True, check=True, timeout=60)
        return out.stdout.strip().splitlines()[-1]


def still_open(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def timed(fn: Callable[[], Any]) -> tuple[float, str]:
    started = time.perf_counter()
    try:
        result = fn()
        return time.perf_counter() - started, str(getattr(result, "status_code", "ok"))
    except Exception as exc:
        return time.perf_counter() - started, type(exc).__name__


def slowloris(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        mesh = CodeMesh(root=Path(tmp), api_port=free_port(), tunnel_port=free_port())
        mesh.code, mesh.nofile = Path(args.code), args.nofile
        try:
            mesh.start_coordinator()
            key = mesh.make_key("bench")
            proc = psutil.Process(mesh.coordinator.popen.pid)  # type: ignore[union-attr]
            log = mesh.root / "coordinator.log"
            rss0, log0 = proc.memory_info().rss, log.stat().st_size

            def normal() -> httpx.Response:
                return httpx.get(f"{mesh.api}/models", timeout=10,
                                 headers={"Authorization": f"Bearer {key}"})

            before = timed(normal)
            socks = []
            for _ in range(args.conns):
                sock = socket.socket()
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect(("127.0.0.1", mesh.api_port))
                socks.append(sock)
            time.sleep(1)
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(b"POST /v1/chat/completions HTTP/1.1\r\n")
            samples = []
            started = time.monotonic()
            while time.monotonic() - started < args.hold:
                time.sleep(5)
                latency, status = timed(normal)
                samples.append({
                    "t_s": round(time.monotonic() - started),
                    "normal_request_s": round(latency, 3), "status": status,
                    "attack_conns_held": sum(still_open(s) for s in socks),
                    "rss_mb": round(proc.memory_info().rss / 1e6, 1),
                    "log_bytes_added": log.stat().st_size - log0,
                })
                print(json.dumps(samples[-1]), flush=True)
            for sock in socks:
                sock.close()
            return {"attack": "slowloris", "code": str(args.code), "conns": args.conns,
                    "nofile": args.nofile, "normal_before_s": round(before[0], 3),
                    "rss_before_mb": round(rss0 / 1e6, 1), "samples": samples}
        finally:
            mesh.stop()


async def _ledger_kill(args: argparse.Namespace) -> dict[str, Any]:
    from tests.e2e.evil_node import EvilNode, completion
    from tunnel import FrameType

    with tempfile.TemporaryDirectory() as tmp:
        mesh = CodeMesh(root=Path(tmp), api_port=free_port(), tunnel_port=free_port())
        mesh.code = Path(args.code)
        mesh.start_coordinator()
        mesh.key = mesh.make_key("bench")
        node = await EvilNode.start(mesh, "fast", ["fast"])
        node.reply = [(FrameType.DATA, completion("hi", "fast")),
                      (FrameType.END, {"usage": {"prompt_tokens": 1, "completion_tokens": 1}})]
        await asyncio.to_thread(mesh.wait_serving, "fast", 10)
        async with httpx.AsyncClient(timeout=30) as client:
            replies = await asyncio.gather(*[client.post(
                f"{mesh.api}/chat/completions", headers={
                    "Authorization": f"Bearer {mesh.key}", "X-Request-Id": f"kill-{i}"},
                json={"model": "fast", "messages": [{"role": "user", "content": "x"}]})
                for i in range(args.answers)])
        mesh.coordinator.popen.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        mesh.coordinator.popen.wait()  # type: ignore[union-attr]
        await node.close()
        import sqlite3
        db = sqlite3.connect(mesh.coord_state / "coordinator.db")
        rows = db.execute("select count(*) from usage_ledger where request_id like 'kill-%'"
                          ).fetchone()[0]
        db.close()
        return {"attack": "ledger-kill", "code": str(args.code),
                "answers_ok": sum(r.status_code == 200 for r in replies),
                "ledger_rows": rows}


async def _request_id(args: argparse.Namespace) -> dict[str, Any]:
    from tests.e2e.evil_node import EvilNode, completion, drain
    from tunnel import FrameType

    with tempfile.TemporaryDirectory() as tmp:
        mesh = CodeMesh(root=Path(tmp), api_port=free_port(), tunnel_port=free_port())
        mesh.code = Path(args.code)
        try:
            mesh.start_coordinator()
            mesh.key = mesh.make_key("bench")
            node = await EvilNode.start(mesh, "chatty", ["chatty"])
            node.reply = [(FrameType.DATA, completion("hi", "chatty")),
                          (FrameType.END, {"usage": None})]
            await asyncio.to_thread(mesh.wait_serving, "chatty", 10)
            log = mesh.root / "coordinator.log"
            before = log.stat().st_size
            stream = await node.ask({"model": "chatty", "messages": [{"role": "user",
                                     "content": "x"}]}, request_id="x" * args.id_bytes)
            frames = await drain(stream)
            await asyncio.sleep(1)  # let the log lines land
            await node.close()
            end = frames[-1]
            return {"attack": "request-id", "code": str(args.code), "id_bytes": args.id_bytes,
                    "answer": end.type.name, "status": (end.body or {}).get("status")
                    if isinstance(end.body, dict) else None,
                    "coordinator_log_bytes_added": log.stat().st_size - before}
        finally:
            mesh.stop()


async def _relay_flood(args: argparse.Namespace) -> dict[str, Any]:
    from tests.e2e.evil_node import EvilNode, completion
    from tunnel import Frame, FrameType, Stream

    with tempfile.TemporaryDirectory() as tmp:
        mesh = CodeMesh(root=Path(tmp), api_port=free_port(), tunnel_port=free_port())
        mesh.code = Path(args.code)
        try:
            mesh.start_coordinator()
            mesh.key = mesh.make_key("keyed")
            release = asyncio.Event()
            worker = await EvilNode.start(mesh, "worker", ["slow"])

            async def answer(stream: Stream, frame: Frame) -> None:
                await release.wait()
                await stream.send(FrameType.DATA, completion("done", "slow"))
                await stream.send(FrameType.END, {"usage": None})

            worker.answer = answer
            asker = await EvilNode.start(mesh, "asker", [])
            await asyncio.to_thread(mesh.wait_serving, "slow", 10)
            for i in range(args.relayed):
                await asker.ask({"model": "slow", "messages": [{"role": "user",
                                 "content": "x"}]}, request_id=f"flood-{i}")
            await asyncio.sleep(1)
            loop = asyncio.get_running_loop()
            loop.call_later(5, release.set)
            started = time.perf_counter()
            async with httpx.AsyncClient(timeout=60) as client:
                reply = await client.post(
                    f"{mesh.api}/chat/completions", json={"model": "slow", "messages": [
                        {"role": "user", "content": "x"}]},
                    headers={"Authorization": f"Bearer {mesh.key}"})
            keyed_s = time.perf_counter() - started
            release.set()
            await asyncio.sleep(2)
            await asker.close()
            await worker.close()
            import sqlite3
            db = sqlite3.connect(mesh.coord_state / "coordinator.db")
            rows = db.execute("select outcome, count(*) from usage_ledger where request_id "
                              "like 'flood-%' group by outcome").fetchall()
            db.close()
            return {"attack": "relay-flood", "code": str(args.code), "relayed": args.relayed,
                    "keyed_status": reply.status_code, "keyed_s": round(keyed_s, 2),
                    "keyed_error": reply.json().get("error", {}).get("code")
                    if reply.status_code != 200 else None,
                    "relayed_ledger_rows": dict(rows)}
        finally:
            mesh.stop()


def ollama_body(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        log = Path(tmp) / "node.log"
        popen = subprocess.Popen(
            [sys.executable, "-m", "node_agent.cli", "run", "--state-dir", f"{tmp}/node",
             "--proxy-port", str(port), "--no-connect"], cwd=args.code,
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(args.code)})
        try:
            from tests.e2e.mesh import Proc
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200,
                       60, "node", [Proc(popen, log)])
            proc = psutil.Process(popen.pid)
            before = proc.memory_info().rss
            limit = args.body_mb * 1_000_000

            def body() -> Any:
                yield b'{"model": "m", "messages": [{"role": "user", "content": "'
                sent = 0
                while sent < limit:
                    yield b"x" * 65_536
                    sent += 65_536
                yield b'"}]}'

            try:
                status: Any = httpx.post(f"http://127.0.0.1:{port}/api/chat", content=body(),
                                         timeout=120).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            return {"attack": "ollama-body", "code": str(args.code), "body_mb": args.body_mb,
                    "answer": status, "rss_before_mb": round(before / 1e6, 1),
                    "rss_growth_mb": round((proc.memory_info().rss - before) / 1e6, 1)}
        finally:
            popen.terminate()
            popen.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("attack", choices=["slowloris", "ledger-kill", "request-id",
                                           "relay-flood", "ollama-body"])
    parser.add_argument("--code", default=str(ROOT))
    parser.add_argument("--conns", type=int, default=1100)
    parser.add_argument("--hold", type=float, default=40)
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("--answers", type=int, default=6)
    parser.add_argument("--id-bytes", type=int, default=4_000_000)
    parser.add_argument("--relayed", type=int, default=300)
    parser.add_argument("--body-mb", type=int, default=200)
    args = parser.parse_args()
    runs = {"ledger-kill": _ledger_kill, "request-id": _request_id, "relay-flood": _relay_flood}
    sync = {"slowloris": slowloris, "ollama-body": ollama_body}
    result = sync[args.attack](args) if args.attack in sync else asyncio.run(
        runs[args.attack](args))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
