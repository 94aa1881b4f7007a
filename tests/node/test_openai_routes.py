"""The local port's OpenAI routes over the named fake runtime (in memory, no model):
usage chunk only when asked, /v1/models/{id}, 404/405 in OpenAI's shape, X-Request-Id,
over-context as 400 context_length_exceeded, and the pipeline metering each request once."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshgate.openai import OpenAIError
from node_agent.metrics import NodeMetrics
from node_agent.models import ModelManager
from node_agent.pipeline import Finished
from node_agent.placement import Budget
from node_agent.proxy import build_app, served_app
from node_agent.runtimes.base import FakeRuntime

pytestmark = pytest.mark.timeout(30)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


#: As the daemon serves the app (node_agent/proxy.py's served_app): with the hot routes in
#: front, and without them (the Starlette routes, which serve browsers' requests).
SERVED = [pytest.param(True, id="hot-routes"), pytest.param(False, id="starlette-routes")]


@pytest.fixture(params=SERVED)
async def setup(
    tmp_path: Path, request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[httpx.AsyncClient, NodeMetrics, Any]]:
    manager = ModelManager(run_dir=tmp_path, budget=Budget(1 << 30, 0))
    fake = FakeRuntime("m", chunks=3)
    manager.add_runtime(fake)
    manager.add_runtime(
        FakeRuntime(
            "tiny",
            fail=OpenAIError(
                400, "Requested tokens (3031) exceed context window of 2048", hop="runner"
            ),
        )
    )
    metrics = NodeMetrics(served=manager.names)
    app = build_app(manager, metrics=metrics)
    finished: list[Finished] = []
    app.state.pipeline.on_finish(finished.append)
    transport = httpx.ASGITransport(app=served_app(app, hot=request.param))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        yield client, metrics, finished


def events(text: str) -> list[str]:
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


async def test_the_usage_chunk_comes_only_when_asked_and_is_counted_either_way(
    setup: tuple[httpx.AsyncClient, NodeMetrics, list[Finished]],
) -> None:
    client, metrics, finished = setup
    plain = await client.post("/v1/chat/completions", json=CHAT)
    assert plain.status_code == 200
    data = events(plain.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["choices"] for c in chunks)  # the docs' loop: choices[0] always exists
    assert not any("usage" in c for c in chunks)
    asked = await client.post(
        "/v1/chat/completions", json={**CHAT, "stream_options": {"include_usage": True}}
    )
    last = json.loads(events(asked.text)[-2])
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 3
    assert [f.usage and f.usage["completion_tokens"] for f in finished] == [3, 3]
    assert [(f.status, f.via, f.where) for f in finished] == [(200, "proxy", "local")] * 2
    rendered = metrics.render().decode()
    assert 'meshgate_node_tokens_total{kind="completion",model="m"} 6.0' in rendered


async def test_models_list_and_retrieve(
    setup: tuple[httpx.AsyncClient, NodeMetrics, list[Finished]],
) -> None:
    client, _, _ = setup
    listed = (await client.get("/v1/models")).json()
    assert [m["id"] for m in listed["data"]] == ["m", "tiny"]
    one = await client.get("/v1/models/m")
    assert one.status_code == 200
    assert one.json() == {"id": "m", "object": "model", "created": 0, "owned_by": "meshgate-node"}
    missing = await client.get("/v1/models/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    assert missing.json()["error"]["param"] == "model"


async def test_unknown_paths_and_wrong_methods_answer_in_openais_shape(
    setup: tuple[httpx.AsyncClient, NodeMetrics, list[Finished]],
) -> None:
    client, _, _ = setup
    lost = await client.get("/v1/nothing-here")
    assert lost.status_code == 404
    assert lost.json()["error"]["type"] == "invalid_request_error"
    assert "/v1/nothing-here" in lost.json()["error"]["message"]
    wrong = await client.get("/v1/chat/completions")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["message"] == (
        "Invalid method (GET /v1/chat/completions); this route takes POST"
    )
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert wrong.headers["allow"] == "POST"
    assert lost.json()["error"]["code"] == "unknown_url"


async def test_every_response_carries_a_request_id(
    setup: tuple[httpx.AsyncClient, NodeMetrics, list[Finished]],
) -> None:
    client, _, _ = setup
    ids = set()
    for reply in (
        await client.get("/healthz"),
        await client.get("/v1/nothing"),
        await client.post("/v1/chat/completions", json=CHAT),
        await client.post("/v1/chat/completions", content=b"{bad"),
        await client.post("/api/chat", json={"model": "m", "messages": CHAT["messages"]}),
    ):
        assert reply.headers["x-request-id"].startswith("req_")
        ids.add(reply.headers["x-request-id"])
    assert len(ids) == 5
    mine = await client.get("/healthz", headers={"x-request-id": "app-42"})
    assert mine.headers["x-request-id"] == "app-42"
    odd = await client.get("/healthz", headers={"x-request-id": "a b\tc"})
    assert odd.headers["x-request-id"].startswith("req_")


async def test_over_context_is_400_context_length_exceeded_with_the_numbers(
    setup: tuple[httpx.AsyncClient, NodeMetrics, list[Finished]],
) -> None:
    client, _, finished = setup
    for stream in (False, True):
        reply = await client.post("/v1/chat/completions", json={**CHAT, "model": "tiny",
                                                                "stream": stream})
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert "maximum context length is 2048 tokens" in error["message"]
        assert "requested 3031 tokens" in error["message"]
        assert error["param"] == "messages"
    assert [f.status for f in finished] == [400, 400]


async def test_ollama_stream_counts_usage_once_through_the_same_pipeline(
    setup: tuple[httpx.AsyncClient, NodeMetrics, list[Finished]],
) -> None:
    client, _, finished = setup
    reply = await client.post("/api/chat", json={"model": "m", "messages": CHAT["messages"]})
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert lines[-1]["done"] is True
    assert lines[-1]["eval_count"] == 3
    assert "".join(x["message"]["content"] for x in lines) == "tok0 tok1 tok2 "
    [done] = finished
    assert (done.status, done.endpoint, done.usage) == (
        200,
        "chat/completions",
        {"prompt_tokens": done.usage["prompt_tokens"] if done.usage else 0,
         "completion_tokens": 3,
         "total_tokens": (done.usage or {}).get("prompt_tokens", 0) + 3},
    )


@pytest.mark.parametrize("hot", [True, False])
@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", CHAT),
    ("/v1/chat/completions", {**CHAT, "stream": False}),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    ("/api/generate", {"model": "m", "prompt": "hi", "stream": False}),
])
async def test_each_access_line_names_the_model_and_its_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, path: str, body: dict[str, Any], hot: bool,
) -> None:
    manager = ModelManager(run_dir=tmp_path, budget=Budget(1 << 30, 0))
    manager.add_runtime(FakeRuntime("m", chunks=3))
    transport = httpx.ASGITransport(app=served_app(build_app(manager), hot=hot))
    with caplog.at_level(logging.INFO, logger="meshgate.access"):
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            reply = await client.post(path, json=body)
    assert reply.status_code == 200
    (line,) = [r for r in caplog.records if r.name == "meshgate.access"]
    fields = vars(line)
    assert fields["model"] == "m"
    assert fields["route"] == path
    assert fields["prompt_tokens"] > 0
    assert fields["completion_tokens"] > 0


class BreaksMidStream(FakeRuntime):
    """The named fake, failing after its first two chunks (a runner that dies mid-answer)."""

    async def stream(self, endpoint: str, body: bytes) -> AsyncIterator[bytes]:
        parts = super().stream(endpoint, body)
        yield await anext(parts)
        yield await anext(parts)
        await parts.aclose()  # type: ignore[attr-defined]
        raise OpenAIError(502, "the runner died", hop="runner")


@pytest.mark.parametrize("hot", [True, False])
async def test_a_failure_after_the_stream_started_is_its_last_event(
    tmp_path: Path, hot: bool,
) -> None:
    manager = ModelManager(run_dir=tmp_path, budget=Budget(1 << 30, 0))
    manager.add_runtime(BreaksMidStream("m", chunks=5))
    transport = httpx.ASGITransport(app=served_app(build_app(manager), hot=hot))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        reply = await client.post("/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200
    data = events(reply.text)
    assert [json.loads(d)["choices"][0]["delta"]["content"] for d in data[:2]] == ["tok0 ", "tok1 "]
    assert json.loads(data[2])["error"]["message"] == "the runner died"
    assert len(data) == 3  # no [DONE] after an error
