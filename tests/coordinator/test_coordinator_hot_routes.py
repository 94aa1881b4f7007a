"""The hot routes (coordinator/hot_routes.py) answer as the routed app did: refusals in
OpenAI's shape with their ledger row, handlers added after the app was built, the request
id, the live-requests entry, the access line and the 500 of the middleware they skip, and
every other method or path still through the router."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import httpx
import pytest
from sqlalchemy.exc import OperationalError

from coordinator.api import ApiContext, build_app
from coordinator.live_requests import LiveRequests
from coordinator.registry import Registry
from coordinator.spool import answering_database_outages

KEY = "mg_test_key"
HELLO = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _app(verify: Any = None) -> tuple[Any, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    ctx = ApiContext(Registry(), verify_key=verify or (lambda k: "key1" if k == KEY else None),
                     known_models=set, record_usage=rows.append)
    return answering_database_outages(build_app(ctx)), rows


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://coord")


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


async def test_a_hot_request_is_live_while_it_runs_and_has_its_access_line(
        caplog: pytest.LogCaptureFixture) -> None:
    arrived, release = threading.Event(), threading.Event()

    def slow(key: str) -> str | None:
        arrived.set()
        release.wait(10)
        return "key1"

    app, rows = _app(slow)
    app.live = LiveRequests()
    caplog.set_level(logging.INFO, logger="meshgate.access")
    async with _client(app) as client:
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
    assert [(r.status, r.route) for r in lines] == [  # type: ignore[attr-defined]
        (404, "/v1/chat/completions")]
    assert rows[0]["request_id"] == "req_live1"


async def test_an_unhandled_error_on_a_hot_route_is_a_500_and_reaches_the_server(
        caplog: pytest.LogCaptureFixture) -> None:
    rows: list[dict[str, Any]] = []

    def broken() -> set[str]:
        raise RuntimeError("a bug")

    ctx = ApiContext(Registry(), verify_key=lambda k: "key1", known_models=broken,
                     record_usage=rows.append)
    app = build_app(ctx)
    caplog.set_level(logging.INFO, logger="meshgate.access")
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://coord") as client:
        reply = await client.post("/v1/chat/completions", json=HELLO,
                                  headers={"authorization": f"Bearer {KEY}"})
    assert reply.status_code == 500
    assert reply.text == "Internal Server Error"
    assert reply.headers["x-request-id"].startswith("req_")
    lines = [r for r in caplog.records if r.name == "meshgate.access"]
    assert [r.status for r in lines] == [500]  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="a bug"):  # the server sees it (and logs it)
        async with _client(app) as client:
            await client.post("/v1/chat/completions", json=HELLO,
                              headers={"authorization": f"Bearer {KEY}"})
