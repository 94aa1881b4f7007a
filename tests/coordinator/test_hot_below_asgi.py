"""The hot routes answered below ASGI (meshgate/http_hot.py, on the daemons' own protocol)
answer word for word as through ASGI: each refusal side by side (status, body, headers,
ledger row), the request id, keep-alive and pipelining. The live entry, the access line and
the 500 of an unhandled error are test_coordinator_hot_routes.py's, both ways; the
coordinator's answered requests on this server are in coordinator_harness's tests."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from coordinator.api import ApiContext, build_app
from coordinator.hot_routes import CoordinatorApp
from coordinator.registry import Registry
from coordinator.spool import answering_database_outages
from meshgate.openai import MAX_BODY_BYTES
from tests.coordinator.coordinator_harness import served

KEY = "mg_test_key"
AUTH = {"authorization": f"Bearer {KEY}"}
HELLO = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
#: headers of the server itself, or of this one answer
VARYING = {"date", "server", "x-request-id"}


def _app(verify: Any = None, known: Any = set) -> tuple[CoordinatorApp, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    ctx = ApiContext(Registry(), verify_key=verify or (lambda k: "key1" if k == KEY else None),
                     known_models=known, record_usage=rows.append)
    app = answering_database_outages(build_app(ctx))
    assert isinstance(app, CoordinatorApp)
    return app, rows


CASES: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("no key", "/v1/chat/completions", json.dumps(HELLO).encode(), {}),
    ("wrong key", "/v1/completions", b'{"model": "m", "prompt": "x"}',
     {"authorization": "Bearer nope"}),
    ("bad json", "/v1/chat/completions", b"{not json", AUTH),
    ("no messages", "/v1/chat/completions", b'{"model": "m"}', AUTH),
    ("wrong type", "/v1/embeddings", b'{"model": "m", "input": 5}', AUTH),
    ("unknown model", "/v1/chat/completions", json.dumps(HELLO).encode(), AUTH),
    ("bad route", "/v1/chat/completions", b'{"model": "qg://nope=1", "messages": []}', AUTH),
    ("too large", "/v1/embeddings", b'{"model": "m", "input": "' + b"x" * MAX_BODY_BYTES + b'"}',
     AUTH),
]


def _shape(reply: httpx.Response) -> tuple[int, Any, dict[str, str]]:
    headers = {k: v for k, v in reply.headers.items() if k not in VARYING}
    return reply.status_code, reply.json(), headers


@pytest.mark.parametrize(("name", "path", "body", "headers"), CASES, ids=[c[0] for c in CASES])
async def test_a_refusal_below_asgi_is_the_asgi_one_word_for_word(
        name: str, path: str, body: bytes, headers: dict[str, str]) -> None:
    app, rows = _app()
    calls = 0
    routed = CoordinatorApp.__call__

    async def counted(self: Any, scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        await routed(self, scope, receive, send)

    answers = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://coord") as asgi:
        answers.append(await asgi.post(path, content=body, headers={
            **headers, "x-request-id": "req_asgi", "content-type": "application/json"}))
    asgi_rows = list(rows)
    rows.clear()
    CoordinatorApp.__call__ = counted  # type: ignore[method-assign]
    try:
        async with served(app, daemon=True) as url, httpx.AsyncClient(base_url=url) as client:
            answers.append(await client.post(path, content=body, headers={
                **headers, "x-request-id": "req_hot", "content-type": "application/json"}))
    finally:
        CoordinatorApp.__call__ = routed  # type: ignore[method-assign]
    assert calls == 0  # answered below ASGI: the app was never called
    assert answers[0].status_code >= 400
    assert _shape(answers[1]) == _shape(answers[0])
    assert [a.headers["x-request-id"] for a in answers] == ["req_asgi", "req_hot"]
    assert [{**r, "request_id": "-"} for r in rows] == [
        {**r, "request_id": "-"} for r in asgi_rows]
    assert [r["request_id"] for r in rows] == ["req_hot"]


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status, *lines = head[:-4].split(b"\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    body = await reader.readexactly(int(headers[b"content-length"]))
    return status, headers, body


def _post(path: str, body: bytes, request_id: str, extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: c\r\nx-request-id: {request_id}\r\n"
            f"authorization: Bearer nope\r\ncontent-length: {len(body)}\r\n").encode() + \
        extra + b"\r\n" + body


async def test_kept_alive_and_pipelined_hot_requests_are_answered_in_order() -> None:
    app, rows = _app()
    async with served(app, daemon=True) as url:
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_post("/v1/chat/completions", b"{}", "req_one"))
        first = await _answer(reader)
        writer.write(_post("/v1/completions", b"{}", "req_two")
                     + _post("/v1/embeddings", b"{}", "req_three")
                     + b"GET /v1/models HTTP/1.1\r\nHost: c\r\n\r\n")
        answers = [first] + [await _answer(reader) for _ in range(3)]
        writer.write(_post("/v1/embeddings", b"{}", "req_last", b"connection: close\r\n"))
        last = await _answer(reader)
        assert await reader.read() == b""  # closed after the answer it asked to be the last
        writer.close()
    assert [a[0] for a in answers] == [b"HTTP/1.1 401 Unauthorized"] * 4
    assert [a[1].get(b"x-request-id") for a in answers[:3]] == [b"req_one", b"req_two",
                                                                  b"req_three"]
    assert last[1][b"connection"] == b"close"
    assert last[1][b"x-request-id"] == b"req_last"
    assert [r["request_id"] for r in rows][:3] == ["req_one", "req_two", "req_three"]
