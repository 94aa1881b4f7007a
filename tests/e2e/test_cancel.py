"""A client that goes away mid-stream stops generation on the node, on either port.

The runner counts, for each cancelled stream, the tokens it generated in all and
those after the stop reached it; the test compares the total with what the
client had read when it left (the rest was in flight in buffers and the tunnel).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from node_agent.runtimes.llama.supervisor import socket_path
from tests.e2e.mesh import Mesh, mesh_at, wait_until

pytestmark = pytest.mark.slow

MODEL = "smollm2"
MAX_TOKENS = 400
READ_CHUNKS = 5


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Mesh]:
    for mesh in mesh_at(tmp_path_factory.mktemp("cancel")):
        mesh.start_coordinator()
        mesh.key = mesh.make_key("cancel")
        assert mesh.enroll("node-a").returncode == 0
        mesh.start_node("node-a", f"{MODEL}={model_path}")
        mesh.wait_serving(MODEL)
        yield mesh


def runner_health(mesh: Mesh) -> dict[str, Any]:
    base = mesh.proxy("node-a").removesuffix("/v1")
    runner = httpx.get(base + "/meshgate/telemetry").json()["runtime"][MODEL]["runner"]
    sock = socket_path(mesh.root / "node-a" / "run", runner)
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as client:
        health: dict[str, Any] = client.get("http://runner/health").json()
    return health


@pytest.mark.parametrize("port", ["coordinator", "node"])
def test_leaving_mid_stream_stops_generation_within_a_chunk(mesh: Mesh, port: str) -> None:
    before = len(runner_health(mesh)["stopped"])
    url = mesh.api if port == "coordinator" else mesh.proxy("node-a")
    body = {
        "model": MODEL,
        "prompt": "Count from 1 to 500: 1, 2, 3,",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {mesh.key}"}
    read = 0
    with httpx.stream("POST", f"{url}/completions", json=body, headers=headers,
                      timeout=60) as reply:  # a fresh runner answers its first in seconds
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: "):
                read += 1
            if read == READ_CHUNKS:
                break  # the client goes away: the connection closes here

    wait_until(lambda: len(runner_health(mesh)["stopped"]) > before, 10, "the runner stopped")
    stopped = runner_health(mesh)["stopped"][-1]
    assert stopped["after_stop"] <= 1  # the runner stops on the token it was on
    # what it generated beyond what the client read was in flight when the client left:
    # a few tokens, not the 400 asked for (on a quiet box it is none)
    assert stopped["tokens"] <= read + 32, stopped
    print(f"{port}: client read {read} chunks, runner generated {stopped['tokens']} tokens")
