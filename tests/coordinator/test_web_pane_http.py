"""The web pane over plain HTTP (no browser): sign-in, the cookie, what a change needs,
the live event stream, and that nothing secret is in the page."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.coordinator.admin_harness import Admined, admined


@pytest.fixture
async def coord(tmp_path: Path) -> AsyncIterator[Admined]:
    async with admined(tmp_path) as harness:
        yield harness


async def sign_in(coord: Admined) -> str:
    reply = await coord.http.post("/ui/login", data={"admin_key": coord.admin_key})
    assert reply.status_code == 303
    cookie = reply.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/ui" in cookie
    session: str = reply.cookies["meshgate_admin"]
    coord.http.cookies.clear()  # each request below says which cookie it sends
    return session


def with_session(session: str, **headers: str) -> dict[str, str]:
    return {"Cookie": f"meshgate_admin={session}", **headers}


async def test_without_a_session_the_pane_is_a_sign_in_form(coord: Admined) -> None:
    reply = await coord.http.get("/ui")
    assert reply.status_code == 200
    assert 'name="admin_key"' in reply.text
    assert "default-src 'self'" in reply.headers["content-security-policy"]
    assert (await coord.http.get("/ui/events")).status_code == 401


async def test_an_apps_key_or_a_wrong_key_does_not_sign_in(coord: Admined) -> None:
    app_key = (await coord.call("POST", "/keys", json={"name": "app"})).json()["key"]
    for key in (app_key, "mga_x_y", ""):
        reply = await coord.http.post("/ui/login", data={"admin_key": key})
        assert reply.status_code == 401
        assert "set-cookie" not in reply.headers


async def test_the_signed_in_pane_holds_no_secret(coord: Admined) -> None:
    session = await sign_in(coord)
    await coord.call("POST", "/keys", json={"name": "app"})
    page = await coord.http.get("/ui", headers=with_session(session))
    assert page.status_code == 200
    assert 'sse-connect="/ui/events"' in page.text
    assert coord.admin_key not in page.text
    assert "mg_" not in page.text
    assert session not in page.text


async def test_a_change_needs_the_session_and_htmxs_header(coord: Admined) -> None:
    session = await sign_in(coord)
    forged = await coord.http.post("/ui/keys", data={"name": "x"}, headers=with_session(session))
    assert forged.status_code == 403  # a plain cross-site form cannot add HX-Request
    anonymous = await coord.http.post("/ui/keys", data={"name": "x"},
                                      headers={"HX-Request": "true"})
    assert anonymous.status_code == 403
    made = await coord.http.post("/ui/keys", data={"name": "x", "rpm": "5"},
                                 headers=with_session(session, **{"HX-Request": "true"}))
    assert made.status_code == 200
    assert "mg_" in made.text  # shown once, to the one who made it
    [key] = (await coord.call("GET", "/keys")).json()["data"]
    assert (key["name"], key["rpm"]) == ("x", 5)
    bad = await coord.http.post("/ui/tokens", data={"ttl": "soon"},
                                headers=with_session(session, **{"HX-Request": "true"}))
    assert "bad duration" in bad.text


async def test_revoking_the_admin_key_ends_its_sessions(coord: Admined) -> None:
    session = await sign_in(coord)
    [record] = await asyncio.to_thread(coord.admin.keys.list)
    await asyncio.to_thread(coord.admin.keys.revoke, record.key_id, 0.0)
    page = await coord.http.get("/ui", headers=with_session(session))
    assert 'name="admin_key"' in page.text


async def test_the_event_stream_sends_every_fragment(coord: Admined) -> None:
    session = await sign_in(coord)
    seen: set[str] = set()
    async with coord.http.stream("GET", "/ui/events", headers=with_session(session)) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        async for line in reply.aiter_lines():
            if line.startswith("event: "):
                seen.add(line.removeprefix("event: "))
            if {"summary", "fleet", "requests", "models", "usage", "keys", "tokens",
                    "series"} <= seen:
                break
    assert "series" in seen


async def test_static_files_are_served_with_the_package(coord: Admined) -> None:
    for name in ("htmx.min.js", "htmx-ext-sse.js", "uPlot.iife.min.js", "pane.js", "pane.css"):
        reply = await coord.http.get(f"/ui/static/{name}")
        assert reply.status_code == 200, name


async def test_usage_shows_energy_once_the_ledger_has_joules(coord: Admined) -> None:
    import time

    from coordinator.store import UsageRecord

    session = await sign_in(coord)
    base = {"key_id": None, "node_did": "did:key:z6MkGPU", "model": "m", "endpoint": "chat",
            "prompt_tokens": 400, "completion_tokens": 600, "latency_ms": 9.0, "outcome": "ok",
            "created_at": time.time()}
    coord.store.record_usage(UsageRecord(request_id="r1", **base))
    before = (await coord.http.get("/ui", headers=with_session(session))).text
    assert "J / 1k tok" not in before  # nothing measured: no energy column, no made-up 0
    coord.store.record_usage(UsageRecord(request_id="r2", joules=250.0,
                                         **base))
    after = (await coord.http.get("/ui", headers=with_session(session))).text
    assert "J / 1k tok" in after
    assert "250.0 J" in after
    assert "250.0</td>" in after  # 250 J over the 1k tokens of the one measured row


async def test_a_node_revoked_in_the_pane_is_disconnected_at_once(coord: Admined) -> None:
    did = await coord.node(["m"], {"host": {}})
    session = await sign_in(coord)
    page = (await coord.http.get("/ui", headers=with_session(session))).text
    assert f"/ui/nodes/{did}/revoke" in page
    reply = await coord.http.post(f"/ui/nodes/{did}/revoke",
                                  headers=with_session(session, **{"HX-Request": "true"}))
    assert "revoked; its tunnel is closed" in reply.text
    assert coord.admin.registry.get(did) is None
    assert coord.store.get_node(did).revoked_at is not None
