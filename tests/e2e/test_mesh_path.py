"""Request path 1's way out: an app asks its own box for a model the box does not serve;
the node asks the coordinator over its tunnel, which places it on another node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from coordinator.ledger_journal import JOURNAL_DIR
from coordinator.state import StateDir
from coordinator.store import Store, UsageRecord
from node_agent.runtimes.llama.supervisor import socket_path
from tests.e2e.mesh import Mesh, mesh_at, wait_until

pytestmark = pytest.mark.slow

MODEL = "smollm2"
HELLO: list[Any] = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Mesh]:
    for mesh in mesh_at(tmp_path_factory.mktemp("meshpath")):
        mesh.start_coordinator()
        mesh.key = mesh.make_key("meshpath")
        for node in ("big", "small"):
            assert mesh.enroll(node).returncode == 0
        mesh.start_node("big", f"{MODEL}={model_path}")
        mesh.start_node("small")  # serves nothing itself
        mesh.wait_serving(MODEL)
        wait_until(lambda m=mesh: m.connected_nodes() == 2, 30, "both nodes connected")  # type: ignore[misc]
        yield mesh


def small(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.proxy("small"), api_key="unused", max_retries=0,
                         timeout=120)


def ledger(mesh: Mesh) -> list[UsageRecord]:
    store = Store(StateDir(mesh.coord_state).db_url)
    try:
        return store.usage_rows_durable(mesh.coord_state / JOURNAL_DIR)
    finally:
        store.close()


def test_a_model_this_box_lacks_is_answered_by_another_node(mesh: Mesh) -> None:
    reply = small(mesh).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6)
    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0
    def relayed() -> list[UsageRecord]:
        return [r for r in ledger(mesh) if (r.route or "").startswith("node:")]

    wait_until(lambda: bool(relayed()), 10, "the ledger row of the relayed request")  # async
    rows = relayed()
    assert rows[-1].key_id is None
    assert rows[-1].outcome == "ok"
    assert rows[-1].node_did is not None
    assert rows[-1].node_did not in (rows[-1].route or "")  # served by the other node


def test_streaming_through_the_mesh_ends_with_usage(mesh: Mesh) -> None:
    stream = small(mesh).chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_a_model_nobody_serves_is_the_coordinators_404(mesh: Mesh) -> None:
    reply = httpx.post(
        mesh.proxy("small") + "/chat/completions",
        json={"model": "no-such-model", "messages": HELLO},
        timeout=30,
    )
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert error["hop"] == "coordinator"
    assert "no-such-model" in error["message"]


def test_the_local_model_list_stays_local(mesh: Mesh) -> None:
    assert [m.id for m in small(mesh).models.list()] == []


def test_leaving_mid_stream_on_this_box_stops_the_other_nodes_runner(mesh: Mesh) -> None:
    def stops() -> int:
        base = mesh.proxy("big").removesuffix("/v1")
        runner = httpx.get(base + "/meshgate/telemetry").json()["runtime"][MODEL]["runner"]
        sock = socket_path(mesh.root / "big" / "run", runner)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as client:
            return len(client.get("http://runner/health").json()["stopped"])

    before = stops()
    body = {"model": MODEL, "prompt": "Count to 500: 1, 2,", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", mesh.proxy("small") + "/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        for n, _ in enumerate(reply.iter_lines()):
            if n == 6:
                break  # the app goes away
    wait_until(lambda: stops() > before, 15, "the runner on the other node stopped")


def test_an_ollama_app_on_this_box_reaches_the_other_node_too(mesh: Mesh) -> None:
    client = ollama.Client(host=mesh.proxy("small").removesuffix("/v1"))
    reply = client.chat(model=MODEL, messages=HELLO, options={"num_predict": 6}, stream=False)
    assert reply.message.content
    assert (reply.eval_count or 0) > 0
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="no-such-model", messages=HELLO)
    assert caught.value.status_code == 404
