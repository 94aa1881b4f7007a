"""The hot routes (coordinator/hot_routes.py) answer as the routed app did: refusals in
OpenAI's shape with their ledger row, handlers added after the app was built, the request
id, the live-requests entry, the access line and the 500 of the middleware they skip, and
every other method or path still through the router. The live entry, the access line and
the 500 are checked both ways a hot route is answered: through ASGI (`asgi`: tests' ASGI
transport, any server) and below it on the daemons' own protocol (`below_asgi`:
meshgate/http_hot.py); test_hot_below_asgi.py compares the two word for word."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy.exc import OperationalError

from coordinator.api import ApiContext, build_app
from coordinator.live_requests import LiveRequests
from coordinator.registry import Registry
from coordinator.spool import answering_database_outages
from tests.coordinator.coordinator_harness import served

KEY = "mg_test_key"
HELLO = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
WAYS = ["asgi", "below_asgi"]


def _app(verify: Any = None, known: Any = set) -> tuple[Any, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    ctx = ApiContext(Registry(), verify_key=verify or (lambda k: "key1" if k == KEY else None),
                     known_models=known, record_usage=rows.append)
    return answering_database_outages(build_app(ctx)), rows


@contextlib.asynccontextmanager
async def _client(app: Any, way: str = "asgi") -> AsyncIterator[httpx.AsyncClient]:
    """A client of `app`: through ASGI, or on a server of the daemons' protocol."""
    if way == "asgi":
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://coord") as client:
            yield client
    else:
        async with served(app, daemon=True) as url, httpx.AsyncClient(base_url=url) as client:
            yield client


async def test_a_refusal_on_a_hot_route_has_openais_shape_its_row_and_the_request_id() -> None:
    app, rows = _app()
    async with _client(app) as client:
        reply = await client.post("/v1/chat/completions", json=HELLO,
                                  headers={"x-request-id": "req_hot1"})
        unknown = await client.post("/v1/chat/completions", json=HELLO,
                                    headers={"authorization": f"Bearer {KEY}"})
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "invalid_api_key"
    assert reply.headers["x-request-id"] == "req_hot1"  # the middleware above still ran
    assert unknown.status_code == 404
    assert unknown.json()["error"]["param"] == "model"
    assert [(r["request_id"], r["status"]) for r in rows] == [("req_hot1", 401),
                                                              (unknown.headers["x-request-id"],
                                                               404)]
    assert rows[1]["key_id"] == "key1"


async def test_a_handler_added_after_the_app_was_built_answers_on_a_hot_route() -> None:
    def down(key: str) -> str | None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    app, _ = _app(down)
    async with _client(app) as client:
        reply = await client.post("/v1/embeddings", json={"model": "m", "input": "x"},
                                  headers={"authorization": f"Bearer {KEY}"})
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "database_unavailable"


async def test_other_methods_and_paths_still_go_through_the_router() -> None:
    app, _ = _app()
    async with _client(app) as client:
        wrong = await client.get("/v1/completions", headers={"authorization": f"Bearer {KEY}"})
        slash = await client.post("/v1/completion", json={},
                                  headers={"authorization": f"Bearer {KEY}"})
        models = await client.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
    assert wrong.status_code == 405
    assert "POST" in wrong.json()["error"]["message"]
    assert slash.status_code == 404
    assert slash.json()["error"]["code"] == "unknown_url"
    assert models.status_code == 200
    assert models.json()["object"] == "list"


@pytest.mark.parametrize("way", WAYS)
async def test_a_hot_request_is_live_while_it_runs_and_has_its_access_line(
        way: str, caplog: pytest.LogCaptureFixture) -> None:
    arrived, release = threading.Event(), threading.Event()

    def slow(key: str) -> str | None:
        arrived.set()
        release.wait(10)
        return "key1"

    app, rows = _app(slow)
    app.live = LiveRequests()
    caplog.set_level(logging.INFO, logger="meshgate.access")
    async with _client(app, way) as client:
        reply = asyncio.ensure_future(client.post(
            "/v1/chat/completions", json=HELLO,
            headers={"authorization": f"Bearer {KEY}", "x-request-id": "req_live1"}))
        assert await asyncio.to_thread(arrived.wait, 10)
        live = app.live.snapshot(time.time())
        release.set()
        answer = await reply
    assert [(r["request_id"], r["endpoint"], r["status"]) for r in live] == [
        ("req_live1", "chat/completions", None)]
    assert len(app.live) == 0  # forgotten once answered
    assert answer.status_code == 404
    assert answer.headers["x-request-id"] == "req_live1"
    lines = [r for r in caplog.records if r.name == "meshgate.access"]
    assert [(r.status, r.route, r.model) for r in lines] == [  # type: ignore[attr-defined]
        (404, "/v1/chat/completions", "m")]
    assert rows[0]["request_id"] == "req_live1"


async def _post_raw(url: str, body: bytes) -> tuple[bytes, dict[bytes, bytes], bytes, bool]:
    """POST `body` to the chat route on one connection of its own: (status line, headers,
    body, whether the server closed the connection after the answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: c\r\nx-request-id: req_bug\r\n"
                 b"authorization: Bearer " + KEY.encode() + b"\r\ncontent-length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    head = await reader.readuntil(b"\r\n\r\n")
    status, *lines = head[:-4].split(b"\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    text = await reader.readexactly(int(headers[b"content-length"]))
    closed = await reader.read() == b""
    writer.close()
    return status, headers, text, closed


@pytest.mark.parametrize("way", WAYS)
async def test_an_unhandled_error_on_a_hot_route_is_a_500_and_reaches_the_server(
        way: str, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> set[str]:
        raise RuntimeError("a bug")

    app, _ = _app(known=broken)
    caplog.set_level(logging.INFO, logger="meshgate.access")
    if way == "asgi":
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://coord") as client:
            reply = await client.post("/v1/chat/completions", json=HELLO, headers={
                "authorization": f"Bearer {KEY}", "x-request-id": "req_bug"})
        status, request_id, text = reply.status_code, reply.headers["x-request-id"], reply.text
        with pytest.raises(RuntimeError, match="a bug"):  # the server sees it (and logs it)
            async with _client(app) as client:
                await client.post("/v1/chat/completions", json=HELLO,
                                  headers={"authorization": f"Bearer {KEY}"})
    else:
        async with served(app, daemon=True) as url:
            line, headers, body, closed = await _post_raw(url, json.dumps(HELLO).encode())
        status, request_id, text = int(line.split()[1]), headers[b"x-request-id"].decode(), \
            body.decode()
        assert closed  # the connection of a failed answer ends, as uvicorn's own does
        logged = [r for r in caplog.records if r.name == "meshgate.httpserver" and r.exc_info]
        assert [str(r.exc_info[1]) for r in logged if r.exc_info] == ["a bug"]  # our log
        assert logged[0].getMessage() == "unhandled error answering POST /v1/chat/completions"
    assert (status, text, request_id) == (500, "Internal Server Error", "req_bug")
    lines = [r for r in caplog.records if r.name == "meshgate.access"]
    assert [r.status for r in lines][:1] == [500]  # type: ignore[attr-defined]
