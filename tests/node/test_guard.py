"""The node's local port refuses what a web page could make a browser send (guard.py):
DNS-rebinding Hosts, cross-site Origins, simple-request content types, browsers on admin
routes. Programs (SDKs, curl) are not affected."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from node_agent.guard import LocalGuard

CHAT = "/v1/chat/completions"
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


def app() -> LocalGuard:
    inner = FastAPI()
    calls: list[str] = []

    @inner.post("/v1/chat/completions")
    @inner.post("/meshgate/unload")
    @inner.post("/api/chat")
    async def answer(request: Request) -> dict[str, Any]:
        calls.append(request.url.path)
        return {"ok": True}

    @inner.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"data": []}

    guard = LocalGuard(inner, allowed_origins=["https://chat.example.com"],
                       allowed_hosts=["mybox.lan"])
    guard.calls = calls  # type: ignore[attr-defined]
    return guard


async def send(method: str, path: str, headers: dict[str, str], body: bytes = BODY
               ) -> httpx.Response:
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:11438") as c:
        return await c.request(method, path, headers=headers,
                               content=body if method != "GET" else None)


@pytest.mark.parametrize("headers", [
    {"content-type": "application/json"},  # the openai SDK
    {"content-type": "application/x-www-form-urlencoded"},  # curl -d, as Ollama's docs
    {"host": "localhost:11438", "content-type": "application/json"},
    {"host": "[::1]:11438", "content-type": "application/json"},
    {"host": "192.168.1.20:11438", "content-type": "application/json"},
    {"host": "mybox.lan", "content-type": "application/json"},
    {"origin": "http://localhost:3000", "content-type": "application/json"},
    {"origin": "https://chat.example.com", "content-type": "application/json; charset=utf-8"},
])
async def test_programs_and_allowed_pages_get_through(headers: dict[str, str]) -> None:
    reply = await send("POST", CHAT, headers)
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(("headers", "status", "code"), [
    ({"host": "evil.example", "content-type": "application/json"}, 403, "host_not_allowed"),
    ({"host": "evil.example:11438"}, 403, "host_not_allowed"),
    ({"host": "localhost.evil.example"}, 403, "host_not_allowed"),
    ({"origin": "http://evil.example", "content-type": "application/json"}, 403,
     "origin_not_allowed"),
    ({"origin": "null", "content-type": "application/json"}, 403, "origin_not_allowed"),
    ({"origin": "http://localhost.evil.example", "content-type": "application/json"}, 403,
     "origin_not_allowed"),
    ({"sec-fetch-site": "cross-site", "content-type": "application/json"}, 403,
     "origin_not_allowed"),
    ({"origin": "http://localhost:3000", "content-type": "text/plain"}, 415,
     "unsupported_media_type"),
    ({"origin": "http://localhost:3000", "content-type": "multipart/form-data; boundary=x"},
     415, "unsupported_media_type"),
    ({"sec-fetch-mode": "no-cors", "sec-fetch-site": "same-origin",
      "content-type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
])
async def test_what_a_web_page_could_send_is_refused(headers: dict[str, str], status: int,
                                                     code: str) -> None:
    reply = await send("POST", CHAT, headers)
    assert reply.status_code == status
    assert reply.json()["error"]["code"] == code
    assert reply.json()["error"]["type"] in ("permission_error", "invalid_request_error")


@pytest.mark.parametrize("origin", ["http://evil.example", "http://localhost:3000"])
async def test_admin_routes_take_no_browser_request(origin: str) -> None:
    reply = await send("POST", "/meshgate/unload",
                       {"origin": origin, "content-type": "text/plain"}, b'{"model": "m"}')
    assert reply.status_code == 403
    reply = await send("POST", "/meshgate/unload", {"content-type": "application/json"},
                       b'{"model": "m"}')
    assert reply.status_code == 200  # the CLI, not a browser


async def test_an_allowed_origin_gets_cors_answers() -> None:
    reply = await send("OPTIONS", CHAT, {
        "origin": "https://chat.example.com", "access-control-request-method": "POST",
        "access-control-request-headers": "content-type, authorization"}, b"")
    assert reply.status_code == 204
    assert reply.headers["access-control-allow-origin"] == "https://chat.example.com"
    reply = await send("GET", "/v1/models", {"origin": "https://chat.example.com"})
    assert reply.headers["access-control-allow-origin"] == "https://chat.example.com"
    refused = await send("OPTIONS", CHAT, {
        "origin": "https://evil.example", "access-control-request-method": "POST"}, b"")
    assert refused.status_code == 403
    assert "access-control-allow-origin" not in refused.headers
