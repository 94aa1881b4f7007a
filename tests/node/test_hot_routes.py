"""The hot routes' own rules (node_agent/hot_routes.py): what they answer and what they hand
to the full app (browsers, a Host the guard refuses, other routes), the body limit, and
errors in OpenAI's shape with the request id. The answers themselves are tested with and
without them in tests/node/test_openai_routes.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from meshgate.logs import AccessLogMiddleware, RequestIdMiddleware
from meshgate.openai import MAX_BODY_BYTES
from node_agent.guard import LocalGuard
from node_agent.hot_routes import HotRoutes
from node_agent.models import ModelManager
from node_agent.placement import Budget
from node_agent.proxy import build_app
from node_agent.runtimes.base import FakeRuntime

pytestmark = pytest.mark.timeout(30)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class Counted:
    """The full app, counting the requests that reach it."""

    def __init__(self, app: LocalGuard) -> None:
        self.app = RequestIdMiddleware(AccessLogMiddleware(app))
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.paths.append(scope["path"])
        await self.app(scope, receive, send)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Counted]]:
    manager = ModelManager(run_dir=tmp_path, budget=Budget(1 << 30, 0))
    manager.add_runtime(FakeRuntime("m", chunks=3))
    app = build_app(manager)
    guard = LocalGuard(app)
    full = Counted(guard)
    transport = httpx.ASGITransport(app=HotRoutes(full, app.state.pipeline, guard))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        yield client, full


async def test_programs_posts_are_answered_in_front_and_the_rest_behind(
    served: tuple[httpx.AsyncClient, Counted],
) -> None:
    client, full = served
    whole = await client.post("/v1/chat/completions", json=CHAT)
    streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert whole.status_code == streamed.status_code == 200
    assert whole.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert streamed.text.endswith("data: [DONE]\n\n")
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert full.paths == []
    assert (await client.get("/v1/chat/completions")).status_code == 405
    assert (await client.get("/v1/models")).status_code == 200
    assert full.paths == ["/v1/chat/completions", "/v1/models"]


async def test_browsers_and_foreign_hosts_go_through_the_guard(
    served: tuple[httpx.AsyncClient, Counted],
) -> None:
    client, full = served
    page = await client.post("/v1/chat/completions", json=CHAT,
                             headers={"origin": "http://localhost:3000"})
    assert page.status_code == 200
    assert page.headers["access-control-allow-origin"] == "http://localhost:3000"
    foreign = await client.post("/v1/chat/completions", json=CHAT,
                                headers={"origin": "https://evil.example"})
    assert foreign.status_code == 403
    rebound = await client.post("/v1/chat/completions", json=CHAT,
                                headers={"host": "rebind.example"})
    assert rebound.status_code == 403
    assert rebound.json()["error"]["code"] == "host_not_allowed"
    fetched = await client.post("/v1/chat/completions", content=json.dumps(CHAT),
                                headers={"sec-fetch-site": "same-origin",
                                         "content-type": "text/plain"})
    assert fetched.status_code == 415
    assert len(full.paths) == 4


async def test_errors_are_openai_objects_with_the_request_id(
    served: tuple[httpx.AsyncClient, Counted],
) -> None:
    client, full = served
    bad = await client.post("/v1/chat/completions", content=b"{bad",
                            headers={"x-request-id": "app-7"})
    assert bad.status_code == 400
    assert bad.headers["x-request-id"] == "app-7"
    assert bad.json()["error"]["code"] == "invalid_json"
    assert bad.json()["error"]["hop"] == "node"
    missing = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert missing.status_code == 404
    assert missing.headers["x-request-id"].startswith("req_")
    too_big = await client.post("/v1/embeddings", content=b"x",
                                headers={"content-length": str(MAX_BODY_BYTES + 1)})
    assert too_big.status_code == 413
    assert "limit" in too_big.json()["error"]["message"]
    assert full.paths == []


async def test_a_body_sent_in_parts_is_read_whole_and_bounded(
    served: tuple[httpx.AsyncClient, Counted],
) -> None:
    client, _ = served
    raw = json.dumps(CHAT).encode()

    async def parts(data: bytes, size: int = 7) -> AsyncIterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i:i + size]

    whole = await client.post("/v1/chat/completions", content=parts(raw))
    assert whole.status_code == 200
    assert whole.json()["object"] == "chat.completion"
    huge = await client.post("/v1/chat/completions",
                             content=parts(b" " * (MAX_BODY_BYTES + 8) + raw, 1 << 16))
    assert huge.status_code == 413
