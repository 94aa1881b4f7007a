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

import inspect
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope

from coordinator.answer_stream import EventStream, Watch
from coordinator.api_context import ApiContext
from coordinator.api_plan import (
    deadline_of,
    for_key,
    from_cache,
    plan,
    spend_refresh,
    tokens_of,
)
from coordinator.cache import CachedResponse
from coordinator.hot_routes import CoordinatorApp, Handler
from coordinator.metrics import CONTENT_TYPE
from coordinator.refusals import install_refusals, with_status
from coordinator.registry import Registry
from coordinator.request_io import JsonAnswer, headers_of, receive_body
from coordinator.routing import ROUTE_HEADER
from coordinator.scheduler import Request as Want
from coordinator.served import Served
from meshgate.logs import AccessLogMiddleware, RequestIdMiddleware, current_request_id
from meshgate.openai import OpenAIError, model_list, model_object, parse, unknown_model
from meshgate.protocol import OpenRequest

# built at start: meshgate.openai defers the request models for the idle node (issue 10);
# the coordinator's first request should not pay for building them
from meshgate.schema import REQUEST_MODELS  # noqa: F401

__all__ = ["ApiContext", "build_app"]

#: FastAPI's own OpenTelemetry (newer FastAPI) off: the coordinator counts in Prometheus and
#: logs JSON lines; left on, every request asks OpenTelemetry three times whether it is set up.
NO_OTEL: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})
_ROUTE_HEADER = ROUTE_HEADER.lower().encode()


def _health(registry: Registry) -> dict[str, Any]:
    """Liveness, and what connected nodes serve now (clouds and aliases not counted)."""
    return {"status": "ok", "nodes": len(registry.nodes()), "node_models": registry.models()}


def build_app(ctx: ApiContext) -> CoordinatorApp:
    app = CoordinatorApp(title="meshgate coordinator", docs_url=None, redoc_url=None, **NO_OTEL)
    _gauges(ctx)

    install_refusals(app, record=ctx.commit,
                     count=ctx.metrics.refused if ctx.metrics is not None else None)

    @app.get("/metrics")
    async def metrics() -> Response:
        if ctx.metrics is None:
            raise OpenAIError(404, "metrics are off", hop="coordinator")
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return _health(ctx.registry)

    _add_model_routes(app, ctx)

    hot = {f"/v1/{endpoint}": _bind(ctx, endpoint)
           for endpoint in ("chat/completions", "completions", "embeddings")}
    for path, handle in hot.items():  # in the router too: another method there is a 405
        app.router.add_route(path, _routed(handle), methods=["POST"],
                             name=path.removeprefix("/v1/"))
    app.set_hot(hot)  # POSTs answered in front of the stack below (hot_routes.py)
    # the rest: innermost first, the access line carries the id
    app.add_middleware(AccessLogMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app


async def _start(ctx: ApiContext, watch: Watch, request: OpenRequest, want: Want, *,
                 deadline: float, asked: str) -> Served:
    """Dispatch `request` (a 499 if the client leaves first)."""
    dispatcher = ctx.dispatcher
    assert dispatcher is not None
    try:
        with watch:
            served = await dispatcher.start(request, want, deadline=deadline, asked=asked)
    except OpenAIError as exc:  # its ledger row is written where it is answered
        exc = ctx.gate.refine_for(request.request_id, exc) if ctx.gate is not None else exc
        raise exc from None
    if ctx.metrics is not None:
        ctx.metrics.served(served.tries, served.upstream)
    return served


async def _whole(ctx: ApiContext, watch: Watch, served: Served, key_id: str,
                 route: str | None) -> bytes:
    """A non-streamed answer's body; its ledger row is stored before it is returned."""
    try:
        with watch:
            return await served.collect()
    finally:
        # the answer read whole has released its node, and the row is stored at once
        # when nobody else is writing: nothing to wait for, so nothing to shield
        if not (served.released and ctx.commit_now(with_status(served.row(key_id, route)))):
            with anyio.CancelScope(shield=True):
                await served.close()
                await ctx.commit(with_status(served.row(key_id, route)))


def _add_model_routes(app: FastAPI, ctx: ApiContext) -> None:
    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        await ctx.authenticate(request)
        return JSONResponse(model_list(_served_names(ctx), owned_by="meshgate"))

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> JSONResponse:
        await ctx.authenticate(request)
        request.state.model = model_id
        if model_id not in _served_names(ctx):
            raise unknown_model(model_id, hop="coordinator")
        return JSONResponse(model_object(model_id, owned_by="meshgate"))


def _bind(ctx: ApiContext, endpoint: str) -> Handler:
    async def route(scope: Scope, receive: Receive) -> Response:
        return await _handle(ctx, scope, receive, endpoint)

    return route


def _routed(handle: Handler) -> Callable[[Request], Awaitable[Response]]:
    """`handle` as a route of the router (a Starlette endpoint)."""
    async def route(request: Request) -> Response:
        return await handle(request.scope, request.receive)

    return route


async def _handle(ctx: ApiContext, scope: Scope, receive: Receive, endpoint: str) -> Response:
    """One POST of the three OpenAI routes (its scope and ``receive``: no Request)."""
    # the scope's headers read once and its state dict written directly: Starlette's
    # `request.headers.get` scans and lower-cases every header on each call
    state: dict[str, Any] = scope.setdefault("state", {})
    headers_in = headers_of(scope)
    route_header = headers_in.get(_ROUTE_HEADER)
    key_id = await ctx.authenticate_header(headers_in.get(b"authorization", ""))
    state["key_id"] = key_id
    raw = await receive_body(receive, headers_in.get(b"content-length"))
    parsed = parse(raw, endpoint)
    body, stream = parsed.body, parsed.stream
    request_id = (current_request_id() or headers_in.get(b"x-request-id")
                  or "req_" + secrets.token_hex(8))
    state["model"] = str(body["model"])
    route, want = await plan(ctx, parsed, route_header)
    if (refreshing := spend_refresh(ctx, key_id)) is not None:
        await refreshing  # its budget's spend, reread off the event loop
    want = for_key(ctx, key_id, body, want, request_id=request_id, header=route_header)
    cached_as, hit = await from_cache(ctx, request_id, key_id, endpoint, body)
    if hit is not None:
        return hit
    deadline = deadline_of(ctx, headers_in.get(b"x-meshgate-timeout"))
    open_request = OpenRequest(request_id, endpoint, want.models[0], stream, raw)
    route_text = str(route) if route.task or body["model"].startswith("qg://") else None
    route_text = route_text or f"qg://prefer={want.prefer.value}"  # the policy it ran under
    state["route"] = route_text
    watch = Watch(receive, scope)  # the client leaving, for every wait
    handed = False  # to the stream's writer, which stops it
    try:
        served = await _start(ctx, watch, open_request, want, deadline=deadline,
                              asked=body["model"])
        state["served"] = served  # its usage, for the access line
        if not stream:
            try:
                data = await _whole(ctx, watch, served, key_id, route_text)
            except OpenAIError:  # a 499: its row, the answer's, is stored already
                state["recorded"] = True
                raise
            if cached_as is not None and ctx.cache is not None and served.outcome == "ok":
                ctx.cache.put(cached_as, CachedResponse(
                    data, served.model, served.target, *tokens_of(served.usage)))
            return JsonAnswer(data, [(b"x-request-id", request_id.encode()),
                                      *served.raw_headers()])
        headers = {"x-request-id": request_id, **served.headers()}
        handed = True
        return EventStream(served, ctx.commit, key_id, route_text,
                           include_usage=parsed.include_usage, headers=headers, watch=watch)
    finally:
        if not handed:
            watch.stop()


def _served_names(ctx: ApiContext) -> list[str]:
    """What a client may ask for now: models on connected nodes, cloud models, aliases."""
    names = set(ctx.registry.models()) | set(ctx.config.aliases)
    if ctx.dispatcher is not None:
        names |= {m for c in ctx.dispatcher.clouds.values() for m in c.upstream.models}
    return sorted(names)


def _gauges(ctx: ApiContext) -> None:
    if ctx.metrics is not None:
        ctx.metrics.count_nodes(lambda: len(ctx.registry.nodes()))
        ctx.metrics.queue_length.set_function(
            lambda: float(ctx.dispatcher.waiting if ctx.dispatcher else 0))


