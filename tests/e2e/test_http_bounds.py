"""Both daemons' HTTP ports from outside, with raw sockets against real processes: slow
clients are cut (head and body timeouts), a flood of them cannot lock out a prompt client
(connection cap), the log says it in a few lines, and the node's local port refuses what a
web page could send (DNS rebinding, cross-site Origin, simple requests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from coordinator.ledger_journal import JOURNAL_DIR
from coordinator.state import StateDir
from coordinator.store import Store
from tests.e2e.evil_node import EvilNode, chunk
from tests.e2e.mesh import Mesh, Proc, free_port, mesh_at, spawn, wait_until
from tunnel import Frame, FrameType, Stream

pytestmark = pytest.mark.slow

LIMITS = {"MESHGATE_HTTP_HEAD_TIMEOUT_S": "1.5", "MESHGATE_HTTP_BODY_TIMEOUT_S": "1.5",
          "MESHGATE_HTTP_WRITE_TIMEOUT_S": "1.5", "MESHGATE_HTTP_MAX_CONNECTIONS": "100"}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    for mesh in mesh_at(tmp_path_factory.mktemp("http")):
        mesh.start_coordinator(env=LIMITS)
        mesh.key = mesh.make_key("http")
        yield mesh


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def slow_clients(port: int, count: int, data: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(data)
        socks.append(sock)
    return socks


def test_a_flood_of_slow_clients_is_cut_and_others_are_served(mesh: Mesh) -> None:
    log = mesh.coordinator.log  # type: ignore[union-attr]
    before = log.stat().st_size
    memory = psutil.Process(mesh.coordinator.popen.pid)  # type: ignore[union-attr]
    rss = memory.memory_info().rss
    socks = slow_clients(mesh.api_port, 300, b"POST /v1/chat/completions HTTP/1.1\r\n")
    try:
        started = time.monotonic()
        reply = httpx.get(f"{mesh.api}/models", timeout=5,
                          headers={"Authorization": f"Bearer {mesh.key}"})
        assert reply.status_code == 200
        assert time.monotonic() - started < 2  # past the cap, the slowest made room for it
        wait_until(lambda: all(closed(s) for s in socks), 10, "every slow client cut")
        assert time.monotonic() - started < 1.5 + 4
        grown = log.stat().st_size - before
        assert grown < 100_000, f"{grown} log bytes for 300 slow clients"
        assert memory.memory_info().rss - rss < 30_000_000
    finally:
        for sock in socks:
            sock.close()


def test_a_stalled_body_is_cut(mesh: Mesh) -> None:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + mesh.key.encode() + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"model\": ")
    (sock,) = slow_clients(mesh.api_port, 1, head)
    try:
        started = time.monotonic()
        wait_until(lambda: closed(sock), 10, "the stalled body cut")
        assert 1.0 < time.monotonic() - started < 6
    finally:
        sock.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, int]]:
    root = tmp_path_factory.mktemp("guard")
    port = free_port()
    proc = spawn("node", ["run", "--state-dir", str(root / "node"), "--proxy-port", str(port),
                          "--no-connect"], root / "node.log")
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200,
                   60, "node", [proc])
        yield proc, port
    finally:
        proc.stop()


@pytest.mark.parametrize(("path", "headers", "status"), [
    ("/meshgate/unload", {"Origin": "http://evil.example", "Content-Type": "text/plain"}, 403),
    ("/meshgate/load", {"Host": "evil.example", "Content-Type": "application/json"}, 403),
    ("/v1/chat/completions", {"Host": "evil.example", "Content-Type": "application/json"},
     403),
    ("/v1/chat/completions", {"Origin": "http://evil.example",
                              "Content-Type": "application/json"}, 403),
    ("/api/chat", {"Origin": "http://localhost:8080", "Content-Type": "text/plain"}, 415),
])
def test_the_node_port_refuses_what_a_web_page_sends(node: tuple[Proc, int], path: str,
                                                     headers: dict[str, str],
                                                     status: int) -> None:
    _, port = node
    reply = httpx.post(f"http://127.0.0.1:{port}{path}", headers=headers,
                       content=b'{"model": "smollm2", "messages": []}')
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["hop"] == "node"


def test_the_node_port_still_answers_programs(node: tuple[Proc, int]) -> None:
    _, port = node
    reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                       json={"model": "nothing-here", "messages": [{"role": "user",
                                                                    "content": "x"}]})
    assert reply.status_code == 404  # past the guard: the route answered


def test_unknown_model_names_fold_into_one_metrics_label(mesh: Mesh) -> None:
    headers = {"Authorization": f"Bearer {mesh.key}"}
    with httpx.Client(timeout=10) as client:
        for i in range(300):
            reply = client.post(f"{mesh.api}/chat/completions", headers=headers, json={
                "model": f"no-such-model-{i}", "messages": [{"role": "user", "content": "x"}]})
            assert reply.status_code == 404
        text = client.get(f"http://127.0.0.1:{mesh.api_port}/metrics").text
    series = [line for line in text.splitlines() if "no-such-model" in line]
    assert series == []
    assert 'model="_unknown"' in text


def test_deep_json_is_a_400_on_the_coordinator(mesh: Mesh) -> None:
    deep = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "x": ' + (
        b"[" * 100_000 + b"]" * 100_000 + b"}")
    reply = httpx.post(f"{mesh.api}/chat/completions", content=deep, headers={
        "Authorization": f"Bearer {mesh.key}", "Content-Type": "application/json"})
    assert reply.status_code == 400
    assert "nested too deeply" in reply.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions", "/meshgate/load"])
def test_deep_json_is_a_400_on_the_node(node: tuple[Proc, int], path: str) -> None:
    _, port = node
    deep = b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    reply = httpx.post(f"http://127.0.0.1:{port}{path}", content=deep,
                       headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert "nested too deeply" in reply.text


def test_a_huge_chunked_ollama_body_is_cut_while_it_is_read(node: tuple[Proc, int]) -> None:
    proc, port = node
    memory = psutil.Process(proc.popen.pid)
    before = memory.memory_info().rss
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        piece = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 65_000
        yield piece
        sent += len(piece)
        while sent < 200_000_000:
            yield b"x" * 65_536
            sent += 65_536

    try:
        reply = httpx.post(f"http://127.0.0.1:{port}/api/chat", content=body(), timeout=30,
                           headers={"Content-Type": "application/json"})
        assert reply.status_code == 413
    except httpx.HTTPError:
        pass  # the node answered 413 and closed while we were still sending
    grown = memory.memory_info().rss - before
    assert grown < 40_000_000, f"node RSS grew {grown / 1e6:.0f} MB"


async def test_a_client_that_reads_nothing_of_its_stream_is_cut(mesh: Mesh) -> None:
    """It would hold the node's slot for as long as it liked; the node is told to stop."""
    evil = await EvilNode.start(mesh, "firehose", ["firehose"])
    piece = chunk("x" * 2000, "firehose")

    async def answer(stream: Stream, frame: Frame) -> None:
        with contextlib.suppress(Exception):
            for _ in range(100_000):
                await stream.send(FrameType.DATA, piece)
            await stream.send(FrameType.END, {"usage": None})

    evil.answer = answer
    sock = socket.socket()
    try:
        await asyncio.to_thread(mesh.wait_serving, "firehose", 10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", mesh.api_port))
        body = json.dumps({"model": "firehose", "stream": True,
                           "messages": [{"role": "user", "content": "x"}]}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + mesh.key.encode() + b"\r\nX-Request-Id: never-reads\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)

        def cancelled() -> bool:
            store = Store(StateDir(mesh.coord_state).db_url)
            try:
                rows = [r for r in store.usage_rows_durable(mesh.coord_state / JOURNAL_DIR)
                        if r.request_id == "never-reads"]
            finally:
                store.close()
            return bool(rows) and rows[0].outcome == "client_cancelled"

        await asyncio.to_thread(wait_until, cancelled, 20, "the non-reader cut, node told")
    finally:
        sock.close()
        await evil.close()
