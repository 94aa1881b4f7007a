"""A node's tunnel is cut, or a byte on it is flipped: the session ends, the node comes
back with a fresh handshake under the same identity, with its models, its telemetry
resumes, and requests are served again. Through a fault proxy on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.mesh import Mesh, mesh_at, wait_until
from tests.faultproxy import ThreadedFaultProxy

pytestmark = pytest.mark.slow

MODEL = "smollm2"
HELLO: list[Any] = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, model_path: Path
) -> Iterator[tuple[Mesh, ThreadedFaultProxy]]:
    for mesh in mesh_at(tmp_path_factory.mktemp("reconnect")):
        mesh.start_coordinator()
        mesh.key = mesh.make_key("reconnect")
        proxy = ThreadedFaultProxy("127.0.0.1", mesh.tunnel_port)
        port = proxy.start()
        token = mesh.token("--tunnel-url", f"ws://127.0.0.1:{port}")
        assert mesh.enroll("node-a", token).returncode == 0
        mesh.start_node("node-a", f"{MODEL}={model_path}")
        mesh.wait_serving(MODEL)
        try:
            yield mesh, proxy
        finally:
            proxy.stop()


def live(mesh: Mesh) -> dict[str, Any]:
    [node] = [n for n in mesh.nodes_json() if n.get("connected")] or [{}]
    return node


def answered(mesh: Mesh) -> str:
    client = openai.OpenAI(base_url=mesh.api, api_key=mesh.key, max_retries=0, timeout=60)
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6)
    return reply.choices[0].message.content or ""


def back_with_fresh_telemetry(mesh: Mesh, did: str, since: float) -> bool:
    node = live(mesh)
    summary = node.get("live") or {}
    return (
        node.get("did") == did
        and summary.get("connected_at", 0) > since  # a new connection
        and MODEL in summary.get("models", [])
        and summary.get("mem_total_bytes") is not None  # telemetry sent over it
    )


@pytest.mark.parametrize("fault", ["drop", "flip"])
def test_the_node_comes_back_after_a_fault(
    rig: tuple[Mesh, ThreadedFaultProxy], fault: str
) -> None:
    mesh, proxy = rig
    wait_until(lambda: bool(live(mesh)), 20, "the node in the live view")
    did = live(mesh)["did"]
    assert answered(mesh)
    accepted = proxy.accepted
    since = time.time()
    if fault == "drop":
        proxy.drop()  # RST both ways
    else:
        proxy.flip_byte(64, "down")  # one byte of the next frame to the node
        assert answered_or_failed(mesh) in {200, 502, 503, 504}  # traffic to carry the byte
    procs = [p for p in [mesh.coordinator, *mesh.nodes.values()] if p is not None]
    wait_until(lambda: proxy.accepted > accepted, 30, "a reconnect", procs)
    wait_until(lambda: back_with_fresh_telemetry(mesh, did, since), 30, "node back", procs)
    assert answered(mesh)
    node_log = mesh.nodes["node-a"].log_text()
    assert "reconnecting in" in node_log
    if fault == "flip":
        coordinator_log = mesh.coordinator.log_text() if mesh.coordinator else ""
        assert "decrypt" in (node_log + coordinator_log).lower()


def answered_or_failed(mesh: Mesh) -> int:
    """One request's status; on a tunnel that is about to break it may fail, clearly."""
    try:
        answered(mesh)
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200
