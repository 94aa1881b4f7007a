"""Both daemons' HTTP ports from outside, with raw sockets against real processes: slow
clients are cut (head and body timeouts), a flood of them cannot lock out a prompt client
(connection cap), the log says it in a few lines, and the node's local port refuses what a
web page could send (DNS rebinding, cross-site Origin, simple requests)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.mesh import Mesh, Proc, free_port, mesh_at, spawn, wait_until

pytestmark = pytest.mark.slow

LIMITS = {"MESHGATE_HTTP_HEAD_TIMEOUT_S": "1.5", "MESHGATE_HTTP_BODY_TIMEOUT_S": "1.5",
          "MESHGATE_HTTP_MAX_CONNECTIONS": "100"}


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
