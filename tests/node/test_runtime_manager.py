"""The model manager and its pure spec helpers; an upstream runtime against the
fake OpenAI server on a TCP port, through the proxy in memory."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from meshgate.openai import OpenAIError
from node_agent.models import ModelManager, model_name, parse_model_spec, scan_model_dirs
from node_agent.pipeline import Pipeline
from node_agent.placement import Budget
from node_agent.proxy import build_app

FAKE = str(Path(__file__).with_name("fake_openai_server.py"))


def test_model_specs_name_a_path_or_take_the_files_stem() -> None:
    assert parse_model_spec("smol=/m/SmolLM2.Q4.gguf") == ("smol", Path("/m/SmolLM2.Q4.gguf"))
    assert parse_model_spec("/m/qwen-7b-00001-of-00003.gguf") == (
        "qwen-7b",
        Path("/m/qwen-7b-00001-of-00003.gguf"),
    )
    with pytest.raises(ValueError, match=r"NAME=PATH\.gguf"):
        parse_model_spec("smol=/m/model.bin")
    assert model_name(Path("a/b.Q4_K_M.gguf")) == "b.Q4_K_M"


def test_scanning_dirs_lists_each_model_once_and_first_shards_only(tmp_path: Path) -> None:
    for rel in [
        "a/x.gguf",
        "a/big-00001-of-00002.gguf",
        "a/big-00002-of-00002.gguf",
        "b/x.gguf",
        "b/sub/y.gguf",
        "b/notes.txt",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"GGUF")
    found = scan_model_dirs([tmp_path / "a", tmp_path / "b"])
    assert found == [
        ("big", tmp_path / "a/big-00001-of-00002.gguf"),
        ("x", tmp_path / "a/x.gguf"),
        ("y", tmp_path / "b/sub/y.gguf"),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, FAKE, "--port", str(port), "--name", "gpt-up"])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)
    yield f"{url}/v1"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
async def manager(upstream: str, tmp_path: Path) -> AsyncIterator[ModelManager]:
    manager = ModelManager(run_dir=tmp_path, budget=Budget(1 << 30, 0))
    manager.add_upstream("local-gpt", upstream, upstream_model="gpt-up")
    await manager.start()
    yield manager
    await manager.stop()


async def test_use_counts_in_flight_and_served_requests(manager: ModelManager) -> None:
    body = b'{"model":"local-gpt","messages":[{"role":"user","content":"hi"}]}'
    async with manager.use("local-gpt") as runtime:
        assert manager.stats()["local-gpt"]["in_flight"] == 1
        data, usage = await runtime.complete("chat/completions", body)
    assert json.loads(data)["model"] == "gpt-up"  # the upstream saw its own name
    assert usage is not None
    stats = manager.stats()["local-gpt"]
    assert {k: stats[k] for k in ("state", "kind", "in_flight", "queued", "served", "crashes")} == {
        "state": "loaded",
        "kind": "upstream",
        "in_flight": 0,
        "queued": 0,
        "served": 1,
        "crashes": 0,
    }
    assert stats["generation_tokens_per_s"] is None  # borrowing alone times nothing
    await Pipeline(manager).complete("chat/completions", "local-gpt", body, via="proxy")
    stats = manager.stats()["local-gpt"]
    assert stats["served"] == 2
    assert stats["generation_tokens_per_s"] > 0  # the upstream's usage, timed by the pipeline
    assert stats["idle_s"] is not None
    assert manager.names() == ["local-gpt"]
    assert manager.get("nope") is None


async def test_use_of_an_unknown_model_is_a_404(manager: ModelManager) -> None:
    with pytest.raises(OpenAIError) as caught:
        async with manager.use("nope"):
            pass
    assert (caught.value.status, caught.value.code) == (404, "model_not_found")


async def test_a_model_declared_twice_is_refused(tmp_path: Path) -> None:
    manager = ModelManager(run_dir=tmp_path)
    manager.add_upstream("m", "http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="twice"):
        manager.add_upstream("m", "http://127.0.0.1:1/v1")
    await manager.stop()


async def test_the_proxy_streams_an_upstream_and_passes_its_errors_through(
    manager: ModelManager,
) -> None:
    transport = httpx.ASGITransport(app=build_app(manager))
    async with httpx.AsyncClient(transport=transport, base_url="http://node/v1") as client:
        reply = await client.post(
            "/chat/completions",
            json={
                "model": "local-gpt",
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
            },
        )
        events = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 3
        unknown = await client.get("/models")
        assert [m["id"] for m in unknown.json()["data"]] == ["local-gpt"]
        missing = await client.get("http://node/meshgate/telemetry")
        assert missing.status_code == 404
    await asyncio.sleep(0)
    assert manager.stats()["local-gpt"]["in_flight"] == 0


async def test_an_unreachable_upstream_is_a_503_from_the_node(tmp_path: Path) -> None:
    manager = ModelManager(run_dir=tmp_path)
    manager.add_upstream("gone", f"http://127.0.0.1:{free_port()}/v1")
    transport = httpx.ASGITransport(app=build_app(manager))
    async with httpx.AsyncClient(transport=transport, base_url="http://node/v1") as client:
        reply = await client.post("/completions", json={"model": "gone", "prompt": "x"})
        streamed = await client.post(
            "/completions", json={"model": "gone", "prompt": "x", "stream": True}
        )
    await manager.stop()
    for r in (reply, streamed):
        assert r.status_code == 503
        assert r.json()["error"]["hop"] == "node"


async def test_admin_routes_answer_clients_on_this_box_only(manager: ModelManager) -> None:
    app = build_app(manager)
    far = httpx.ASGITransport(app=app, client=("10.0.0.7", 4242))
    async with httpx.AsyncClient(transport=far, base_url="http://node") as client:
        reply = await client.post("/meshgate/unload", json={"model": "local-gpt"})
    assert reply.status_code == 403
    assert "this box only" in reply.json()["error"]["message"]
    near = httpx.ASGITransport(app=app, client=("127.0.0.1", 4242))
    async with httpx.AsyncClient(transport=near, base_url="http://node") as client:
        reply = await client.post("/meshgate/unload", json={"model": "local-gpt"})
    assert reply.status_code == 400  # heard, and refused for what it asks
    assert "not a local runner" in reply.json()["error"]["message"]
    assert manager.stats()["local-gpt"]["state"] == "loaded"
