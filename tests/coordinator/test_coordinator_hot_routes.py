"""The hot routes (coordinator/hot_routes.py) answer as the routed app did: refusals in
OpenAI's shape with their ledger row, handlers added after the app was built, the
middleware above them, and every other method or path still through the router."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy.exc import OperationalError

from coordinator.api import ApiContext, build_app
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
