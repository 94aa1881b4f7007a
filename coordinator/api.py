"""The coordinator's public OpenAI-compatible API.

`Authorization: Bearer KEY` on every route but `/healthz`; the body goes down
a node's tunnel unchanged and the answer streams back as SSE. Errors have
OpenAI's shape: 401 for a missing or wrong key, 400 for a malformed body, 413
for an oversize one, 404 for a model that no node has ever offered (and no
cloud, alias or task route names), 503 when the model exists but no connected
node or cloud can serve it now, 429 when every candidate is busy and the queue
is full, 504 when the request's deadline passed.

The `model` field may be a model name, an alias or a `qg://` route, and the
`X-Meshgate-Route` header adds route keys (`routing.py`); `X-Meshgate-Timeout`
(seconds) shortens the request's deadline. Dispatch (`dispatch.py`) picks the
node or cloud. A client that goes away before the answer started is noticed
and the node told to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from coordinator.config import CoordinatorConfig
from coordinator.dispatch import Dispatcher, Served
from coordinator.registry import Registry
from coordinator.routing import ROUTE_HEADER, Route, RouteError, UnknownRouteError, parse_route
from coordinator.scheduler import Request as Want
from meshgate.openai import (
    MAX_BODY_BYTES,
    SSE_DONE,
    OpenAIError,
    model_list,
    parse_request,
    sse_error,
    sse_event,
    unknown_model,
)
from meshgate.protocol import OpenRequest

log = logging.getLogger(__name__)

KEY_CACHE_SECONDS = 5.0
DISCONNECT_POLL_S = 0.5
T = TypeVar("T")


@dataclass
class ApiContext:
    """What the API needs from the rest of the coordinator."""

    registry: Registry
    verify_key: Callable[[str], str | None]
    """plaintext key -> key id, or None; blocking (runs in a thread)."""
    known_models: Callable[[], set[str]]
    """every model an enrolled node has offered; blocking."""
    record_usage: Callable[[dict[str, Any]], None]
    """one ledger row; blocking."""
    config: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    dispatcher: Dispatcher | None = None
    _key_cache: dict[str, tuple[float, str]] = field(default_factory=dict)
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    async def authenticate(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise OpenAIError(401, "missing API key: send 'Authorization: Bearer KEY'",
                              code="invalid_api_key", hop="coordinator")
        key = key.strip()
        now = time.monotonic()
        cached = self._key_cache.get(key)
        if cached and cached[0] > now:
            return cached[1]
        key_id = await asyncio.to_thread(self.verify_key, key)
        if key_id is None:
            raise OpenAIError(401, "invalid API key", code="invalid_api_key", hop="coordinator")
        self._key_cache[key] = (now + KEY_CACHE_SECONDS, key_id)
        return key_id

    def __post_init__(self) -> None:
        if self.dispatcher is None:
            self.dispatcher = Dispatcher(self.registry, self.config.dispatch)

    def record(self, row: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.record_usage, row))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OpenAIError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(title="meshgate coordinator", docs_url=None, redoc_url=None)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "nodes": len(ctx.registry.nodes())}

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        await ctx.authenticate(request)
        return JSONResponse(model_list(ctx.registry.models(), owned_by="meshgate"))

    async def handle(request: Request, endpoint: str) -> Response:
        key_id = await ctx.authenticate(request)
        raw = await read_body(request)
        body = parse_request(raw, endpoint)
        stream = bool(body.get("stream", False))
        request_id = request.headers.get("x-request-id") or "req_" + secrets.token_hex(8)
        route, want = await _plan(ctx, body, request.headers.get(ROUTE_HEADER))
        deadline = _deadline(ctx, request.headers.get("x-meshgate-timeout"))
        open_request = OpenRequest(request_id, endpoint, want.models[0], stream, raw)
        dispatcher = ctx.dispatcher
        assert dispatcher is not None
        route_text = str(route) if route.task or body["model"].startswith("qg://") else None
        try:
            served = await _unless_disconnected(
                request, dispatcher.start(open_request, want, deadline=deadline))
        except OpenAIError as exc:
            if exc.status in (429, 503, 504):
                ctx.record(_failed_row(open_request, key_id, exc, route_text))
            raise
        headers = {"x-request-id": request_id, **served.headers()}
        if not stream:
            try:
                data = await _unless_disconnected(request, served.collect())
            finally:
                with anyio.CancelScope(shield=True):
                    await served.close()
                ctx.record(served.row(key_id, route_text))
            return Response(data, media_type="application/json", headers=headers)
        return StreamingResponse(
            _sse(served, ctx, key_id, route_text), media_type="text/event-stream",
            headers=headers,
        )

    for endpoint in ("chat/completions", "completions", "embeddings"):
        app.add_api_route(
            f"/v1/{endpoint}", _bind(handle, endpoint), methods=["POST"], name=endpoint
        )
    return app


def _bind(
    handle: Callable[[Request, str], Any], endpoint: str
) -> Callable[[Request], Any]:
    async def route(request: Request) -> Response:
        result: Response = await handle(request, endpoint)
        return result

    return route


async def _plan(ctx: ApiContext, body: dict[str, Any], header: str | None) -> tuple[Route, Want]:
    """The route and the scheduler's request: candidate models, sizes, policy."""
    try:
        route = parse_route(body["model"], header)
        models = ctx.config.routing().resolve(route)
    except UnknownRouteError as exc:
        raise OpenAIError(404, str(exc), code="model_not_found", param="model",
                          hop="coordinator") from None
    except RouteError as exc:
        raise OpenAIError(400, str(exc), param="model", hop="coordinator") from None
    dispatcher = ctx.dispatcher
    assert dispatcher is not None
    if not any(dispatcher.knows(m) for m in models):
        known = await asyncio.to_thread(ctx.known_models)
        if not any(m in known for m in models):
            raise unknown_model(route.model or "/".join(models), hop="coordinator")
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 0
    want = Want(
        models=models,
        prompt_tokens=len(json.dumps(body.get("messages") or body.get("prompt") or
                                     body.get("input") or "")) // 4,
        max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 0,
        prefer=route.prefer,
        residency=route.residency,
    )
    return route, want


def _deadline(ctx: ApiContext, header: str | None) -> float:
    seconds = ctx.config.dispatch.deadline_s
    if header is not None:
        try:
            asked = float(header)
        except ValueError:
            raise OpenAIError(400, f"X-Meshgate-Timeout must be a number of seconds, not "
                              f"{header[:40]!r}", hop="coordinator") from None
        if not asked > 0:
            raise OpenAIError(400, "X-Meshgate-Timeout must be positive", hop="coordinator")
        seconds = min(seconds, asked)
    return asyncio.get_running_loop().time() + seconds


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OpenAIError):
                await task
            raise OpenAIError(499, "client closed the request", hop="coordinator")


def _failed_row(request: OpenRequest, key_id: str | None, exc: OpenAIError,
                route: str | None) -> dict[str, Any]:
    outcome = {429: "queue_full", 503: "no_capacity", 504: "deadline"}.get(exc.status, "error")
    return {
        "request_id": request.request_id, "key_id": key_id, "node_did": None, "upstream": None,
        "model": request.model, "endpoint": request.endpoint, "prompt_tokens": 0,
        "completion_tokens": 0, "latency_ms": 0.0, "outcome": outcome, "cost": 0.0,
        "route": route,
    }


async def _sse(served: Served, ctx: ApiContext, key_id: str,
               route: str | None) -> AsyncIterator[bytes]:
    try:
        yield sse_event(served.first)
        async for chunk in served.rest():
            yield sse_event(chunk)
        yield SSE_DONE
    except OpenAIError as exc:
        log.warning("request %s ended with an error after it started: %s",
                    served.request.request_id, exc.message)
        yield sse_error(exc)
    finally:
        with anyio.CancelScope(shield=True):
            await served.close()
            ctx.record(served.row(key_id, route))
