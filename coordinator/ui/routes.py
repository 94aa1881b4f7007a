"""The web pane at `/ui`: server-rendered pages, live over SSE, behind the admin key.

    GET  /ui                 the pane (or the sign-in form without a session)
    POST /ui/login           form field `admin_key` -> session cookie, redirect to /ui
    POST /ui/logout
    GET  /ui/events          SSE: HTML fragments named after the element they replace
                             (summary, fleet, requests, models, usage, keys, tokens)
                             and `series` (JSON for the charts)
    POST /ui/keys, /ui/keys/{id}/revoke, /ui/tokens, /ui/tokens/{id}/revoke,
         /ui/nodes/{did}/revoke
    GET  /ui/static/...      htmx, its SSE extension, uPlot, the pane's css and js

The session cookie is HttpOnly, SameSite=Strict and scoped to /ui; the admin
key itself never reaches the page. Changes need the session and htmx's
`HX-Request` header (a cross-site form can send neither). Every page goes
out with a strict Content-Security-Policy (scripts and styles from /ui/static
only, no inline script, no eval).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from coordinator.errors import CoordinatorError
from coordinator.ui.render import render
from coordinator.ui.sessions import SESSION_COOKIE, SESSION_TTL_S
from meshgate.openai import OpenAIError

if TYPE_CHECKING:
    from coordinator.admin_api import AdminContext

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
TICK_S = 1.0
FLEET_SHOWN = 60  # node cards in the pane (the busiest); `meshgate-coordinator nodes` has all
SLOW_EVERY = 5  # ticks between refreshes of what needs the database (usage, keys, tokens)
RECHECK_SESSION_S = 15.0
USAGE_WINDOW_S = 24 * 3600
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; "
    "base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)


def sse(event: str, data: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in data.splitlines() or [""])
    return f"event: {event}\n{lines}\n".encode()


class Pane:
    """What the pane's fragments need, read from the admin context."""

    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        self.version = 0  # bumped by every change made through the pane

    def live(self) -> dict[str, Any]:
        from coordinator.admin_api import live_snapshot

        return live_snapshot(self.ctx, FLEET_SHOWN)

    def fast(self) -> dict[str, str]:
        live = self.live()
        models = live["models"]
        return {
            "summary": render("_summary.html", live=live, models=models),
            "fleet": render("_fleet.html", live=live),
            "requests": render("_requests.html", live=live),
            "models": render("_models.html", models=models),
        }

    async def _stored(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                     list[dict[str, Any]]]:
        """Usage (per key, model, node) over the last day, keys and tokens: the database."""
        ops = self.ctx.ops
        since = time.time() - USAGE_WINDOW_S
        return await asyncio.to_thread(lambda: (
            [ops.usage(by, since) for by in ("key", "model", "node")],
            ops.list_keys(), ops.list_tokens()))

    async def slow(self) -> dict[str, str]:
        usage, keys, tokens = await self._stored()
        return {"usage": render("_usage.html", usage=usage),
                "keys": render("_keys.html", keys=keys),
                "tokens": render("_tokens.html", tokens=tokens),
                "series": json.dumps(self.ctx.traffic.series())}

    async def page(self) -> str:
        live = self.live()
        usage, keys, tokens = await self._stored()
        return render("pane.html", live=live, models=live["models"], usage=usage,
                      keys=keys, tokens=tokens, series_json=json.dumps(self.ctx.traffic.series()))

    async def events(self, request: Request, session: str) -> AsyncIterator[bytes]:
        tick, seen, checked = 0, -1, time.monotonic()
        yield b"retry: 2000\n\n"
        while not self.ctx.stopping():
            for name, fragment in self.fast().items():
                yield sse(name, fragment)
            if tick % SLOW_EVERY == 0 or seen != self.version:
                seen = self.version
                for name, fragment in (await self.slow()).items():
                    yield sse(name, fragment)
            tick += 1
            if time.monotonic() - checked > RECHECK_SESSION_S:
                checked = time.monotonic()
                key_id = await asyncio.to_thread(self.ctx.sessions.get, session)
                if key_id is None or not await self.ctx.key_live(key_id):
                    return  # signed out or its admin key revoked: the stream ends
            await asyncio.sleep(TICK_S)
            if await request.is_disconnected():
                return


async def form(request: Request) -> dict[str, str]:
    raw = await request.body()
    if len(raw) > 16 * 1024:
        raise OpenAIError(413, "form too large")
    fields = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0].strip() for k, v in fields.items() if v}


async def session_of(ctx: AdminContext, request: Request) -> str | None:
    """The request's live session (its admin key still live), or None."""
    session = request.cookies.get(SESSION_COOKIE)
    key_id = await asyncio.to_thread(ctx.sessions.get, session) if session else None
    if key_id is None or not await ctx.key_live(key_id):
        return None
    return session


def static_files() -> StaticFiles:
    """/ui/static: mounted on the app (a router's mounts are not carried over)."""
    return StaticFiles(directory=STATIC)


def ui_router(ctx: AdminContext) -> APIRouter:
    router = APIRouter(prefix="/ui")
    pane = Pane(ctx)

    @router.get("")
    async def index(request: Request) -> Response:
        if await session_of(ctx, request) is None:
            return html(render("login.html", error=None))
        return html(await pane.page())

    @router.post("/login")
    async def login(request: Request) -> Response:
        key = (await form(request)).get("admin_key", "")
        record = await asyncio.to_thread(ctx.keys.verify, key) if key else None
        if record is None:
            log.warning("web pane sign-in refused from %s", request.client.host
                        if request.client else "?")
            return html(render("login.html", error="That is not a live admin key."), 401)
        response = RedirectResponse("/ui", status_code=303, headers=SECURITY_HEADERS)
        opened = await asyncio.to_thread(ctx.sessions.open, record.key_id)
        response.set_cookie(SESSION_COOKIE, opened,
                            max_age=SESSION_TTL_S, path="/ui", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        log.info("web pane sign-in with admin key %s", record.key_id)
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            await asyncio.to_thread(ctx.sessions.close, session)
        response = RedirectResponse("/ui", status_code=303, headers=SECURITY_HEADERS)
        response.delete_cookie(SESSION_COOKIE, path="/ui")
        return response

    @router.get("/events")
    async def events(request: Request) -> Response:
        session = await session_of(ctx, request)
        if session is None:
            return Response("sign in first", status_code=401)
        return StreamingResponse(pane.events(request, session), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    change_routes(router, ctx, pane)
    return router


async def changing(ctx: AdminContext, request: Request) -> None:
    """A change needs a live session and htmx's header (no cross-site form sends it)."""
    if request.headers.get("hx-request") != "true" or await session_of(ctx, request) is None:
        raise OpenAIError(403, "sign in to the pane again", hop="coordinator")


def fragment_error(exc: Exception) -> HTMLResponse:
    return html(render("_error.html", message=str(exc)), 200)


def change_routes(router: APIRouter, ctx: AdminContext, pane: Pane) -> None:
    """Create and revoke keys and tokens; each answers the fragment to swap in."""

    @router.post("/keys")
    async def key_create(request: Request) -> Response:
        await changing(ctx, request)
        fields = await form(request)
        scopes: dict[str, Any] = {}
        if fields.get("models"):
            scopes["models"] = [m.strip() for m in fields["models"].split(",") if m.strip()]
        try:
            if fields.get("rpm"):
                scopes["rpm"] = int(fields["rpm"])
            made = await asyncio.to_thread(ctx.ops.create_key, fields.get("name", ""), scopes)
        except (CoordinatorError, ValueError) as exc:
            return fragment_error(exc)
        pane.version += 1
        return html(render("_created.html", what=f"API key {made['name']}", ident="new-key",
                           note="— copy it now, it is shown only once.", secret=made["key"]))

    @router.post("/keys/{key_id}/revoke")
    async def key_revoke(request: Request, key_id: str) -> Response:
        await changing(ctx, request)
        try:
            await asyncio.to_thread(ctx.ops.revoke_key, key_id)
        except CoordinatorError as exc:
            return fragment_error(exc)
        ctx.forget_keys()
        pane.version += 1
        keys = await asyncio.to_thread(ctx.ops.list_keys)
        return html(render("_keys.html", keys=keys))

    @router.post("/tokens")
    async def token_create(request: Request) -> Response:
        from coordinator.cli_common import parse_duration, parse_labels

        await changing(ctx, request)
        fields = await form(request)
        try:
            made = await asyncio.to_thread(
                ctx.ops.create_token, ttl_s=parse_duration(fields.get("ttl") or "1h"),
                uses=int(fields.get("uses") or 1),
                labels=parse_labels([fields["label"]] if fields.get("label") else []),
                tunnel_url=None)
        except (CoordinatorError, ValueError) as exc:
            return fragment_error(exc)
        pane.version += 1
        uses = made["uses"]
        return html(render("_created.html", what=f"Enrollment token {made['token_id']}",
                           ident="new-token", secret=made["token"],
                           note=f"— good for {uses} node{'s' if uses != 1 else ''}; on each run "
                           "meshgate-node enroll TOKEN."))

    @router.post("/nodes/{did}/revoke")
    async def node_revoke(request: Request, did: str) -> Response:
        await changing(ctx, request)
        try:
            done = await asyncio.to_thread(ctx.ops.revoke_node, did)
        except CoordinatorError as exc:
            return fragment_error(exc)
        await ctx.close_revoked()
        pane.version += 1
        what = "revoked; its tunnel is closed" if done["revoked"] else "was already revoked"
        return html(render("_notice.html", message=f"Node {did} {what}."))

    @router.post("/tokens/{token_id}/revoke")
    async def token_revoke(request: Request, token_id: str) -> Response:
        await changing(ctx, request)
        try:
            await asyncio.to_thread(ctx.ops.revoke_token, token_id)
        except CoordinatorError as exc:
            return fragment_error(exc)
        pane.version += 1
        tokens = await asyncio.to_thread(ctx.ops.list_tokens)
        return html(render("_tokens.html", tokens=tokens))
