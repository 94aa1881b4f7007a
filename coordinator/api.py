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
import inspect
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope

from coordinator.answer_stream import EventStream, Watch
from coordinator.cache import CachedResponse, ResponseCache, cache_key
from coordinator.config import CoordinatorConfig
from coordinator.context_fit import fit_to_context
from coordinator.dispatch import Dispatcher
from coordinator.hot_routes import CoordinatorApp
from coordinator.ledger_row import fit_row
from coordinator.ledger_writer import LedgerWriter
from coordinator.limits import KeyGate
from coordinator.metrics import CONTENT_TYPE, Metrics
from coordinator.refusals import install_refusals, with_status
from coordinator.registry import Registry
from coordinator.routing import ROUTE_HEADER, Route, RouteError, UnknownRouteError, parse_route
from coordinator.scheduler import Request as Want
from coordinator.served import Served
from meshgate.bounds import clip
from meshgate.logs import AccessLogMiddleware, RequestIdMiddleware, current_request_id
from meshgate.openai import (
    MAX_BODY_BYTES,
    OpenAIError,
    Parsed,
    model_list,
    model_object,
    parse,
    unknown_model,
)
from meshgate.protocol import OpenRequest

# built at start: meshgate.openai defers the request models for the idle node (issue 10);
# the coordinator's first request should not pay for building them
from meshgate.schema import REQUEST_MODELS  # noqa: F401

log = logging.getLogger(__name__)

KEY_CACHE_SECONDS = 5.0
#: FastAPI's own OpenTelemetry (newer FastAPI) off: the coordinator counts in Prometheus and
#: logs JSON lines; left on, every request asks OpenTelemetry three times whether it is set up.
NO_OTEL: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})
T = TypeVar("T")
_ROUTE_HEADER = ROUTE_HEADER.lower().encode()


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
    record_usages: Callable[[list[dict[str, Any]]], None] | None = None
    """many ledger rows in one transaction; blocking. None: `record_usage` row by row."""
    record_now: Callable[[list[dict[str, Any]]], bool] | None = None
    """rows stored at once if that cannot wait (False: not stored); see ledger_writer.py"""
    ledger_housekeeping: Callable[[], None] | None = None
    config: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    dispatcher: Dispatcher | None = None
    gate: KeyGate | None = None
    """scopes (403), rate limits (429) and budgets per key; None: none enforced."""
    metrics: Metrics | None = None
    cache: ResponseCache | None = None
    """responses to deterministic requests (cache.py); None: off."""
    _key_cache: dict[str, tuple[float, str]] = field(default_factory=dict)
    _verifying: dict[str, asyncio.Task[str | None]] = field(default_factory=dict)
    _key_generation: int = 0
    _pending: set[asyncio.Task[None]] = field(default_factory=set)
    _ledger: LedgerWriter | None = None

    async def authenticate(self, request: Request) -> str:
        return await self.authenticate_header(request.headers.get("authorization", ""))

    async def authenticate_header(self, header: str) -> str:
        """The key id of an ``Authorization`` header's key (401 when missing or wrong)."""
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise OpenAIError(401, "missing API key: send 'Authorization: Bearer KEY'",
                              code="invalid_api_key", hop="coordinator")
        key = key.strip()
        now = time.monotonic()
        cached = self._key_cache.get(key)
        if cached and cached[0] > now:
            return cached[1]
        # one verification per key at a time: a burst of requests with a key not cached
        # (500 streams at once, or every 5 s) waits on one thread call, not one each
        pending = self._verifying.get(key)
        if pending is None:
            generation = self._key_generation
            pending = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self.verify_key, key))
            self._verifying[key] = pending

            def done(task: asyncio.Task[str | None]) -> None:
                if self._verifying.get(key) is task:
                    del self._verifying[key]
                if (not task.cancelled() and task.exception() is None
                        and task.result() is not None and generation == self._key_generation):
                    self._key_cache[key] = (now + KEY_CACHE_SECONDS, task.result() or "")

            pending.add_done_callback(done)
        key_id = await asyncio.shield(pending)  # a requester that leaves cancels no one else
        if key_id is None:
            raise OpenAIError(401, "invalid API key", code="invalid_api_key", hop="coordinator")
        return key_id

    def forget_keys(self) -> None:
        """Drop every verified key, so a revoke or rotate holds from the next request
        (a verification in flight is not cached: it may predate the change)."""
        self._key_cache.clear()
        self._verifying.clear()
        self._key_generation += 1

    def __post_init__(self) -> None:
        if self.dispatcher is None:
            self.dispatcher = Dispatcher(self.registry, self.config.dispatch)

    def record(self, row: dict[str, Any]) -> None:
        """Count `row` and write it in the background (see `commit` for the durable way)."""
        task = asyncio.get_running_loop().create_task(self.commit(row))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def commit(self, row: dict[str, Any]) -> None:
        """Write `row` to the ledger, returning once it is stored: the answer's last byte
        waits on this, so a crash after an answer was delivered loses no row. It is counted
        (the key's token bucket and budget, metrics) in this turn of the loop, after the
        task's own step: the answer's last bytes, written in that step, leave first."""
        if self.gate is not None or self.metrics is not None:
            asyncio.get_running_loop().call_soon(self._count, row)
        try:
            await self._writer().write(fit_row(row))
        except Exception:
            log.exception("the ledger row of request %s could not be written: %s",
                          row.get("request_id"), clip(repr(row), 1000))

    def commit_now(self, row: dict[str, Any]) -> bool:
        """`commit` when it needs no wait (SQLite with nobody else writing): True once the
        row is stored and its count scheduled as `commit` does; False, nothing done (nor
        raised: `commit` then writes it, or logs why it cannot)."""
        try:
            if not self._writer().try_now(fit_row(row)):
                return False
        except Exception:  # noqa: BLE001 - nothing stored: commit tries again and logs it
            return False
        if self.gate is not None or self.metrics is not None:
            asyncio.get_running_loop().call_soon(self._count, row)
        return True

    def _writer(self) -> LedgerWriter:
        if self._ledger is None:  # rows one at a time unless the store writes them together
            self._ledger = (LedgerWriter(self.record_usages, write_now=self.record_now,
                                         housekeeping=self.ledger_housekeeping)
                            if self.record_usages is not None
                            else LedgerWriter(self._row_by_row, max_batch=1))
        return self._ledger

    def _count(self, row: dict[str, Any]) -> None:
        if self.gate is not None:
            self.gate.finish_row(row)
        if self.metrics is not None:
            self.metrics.observe_row(row)

    def _row_by_row(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.record_usage(row)

    def close(self) -> None:
        """Store the ledger rows still queued and stop the writer thread (blocking)."""
        if self._ledger is not None:
            self._ledger.close()


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """A request's body, refused (413) past `limit` before it is read whole."""
    return await _receive_body(request.receive, request.headers.get("content-length"), limit)


async def _receive_body(receive: Receive, declared: str | None,
                        limit: int = MAX_BODY_BYTES) -> bytes:
    """The body from the ASGI `receive` itself (the hot routes call it directly, no Request
    stream): refused (413) past `limit`, by its declared length first; a client gone before
    its body ended raises ClientDisconnect as Starlette's stream does."""
    if declared and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise OpenAIError(413, f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect


#: The request headers the hot routes read (ASGI names are lower case).
_READ_HEADERS = frozenset({b"authorization", b"content-length", b"x-request-id",
                           ROUTE_HEADER.lower().encode(), b"x-meshgate-timeout"})


def _headers_of(scope: Scope) -> dict[bytes, str]:
    """The headers of `_READ_HEADERS` a request has (the first of each, as Starlette's
    ``Headers.get``), in one pass."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in _READ_HEADERS and name not in found:
            found[name] = value.decode("latin-1")
    return found


class _JsonAnswer(Response):
    """A whole JSON answer: Starlette's ``Response(data, media_type=JSON, headers=...)``
    with its raw headers built here (no header mapping lower-cased and encoded again)."""

    media_type = "application/json"

    def __init__(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        self.raw_headers = [*headers, (b"content-length", str(len(body)).encode()),
                            (b"content-type", b"application/json")]


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
    for path, route in hot.items():  # in the router too: another method there is a 405
        app.router.add_route(path, route, methods=["POST"], name=path.removeprefix("/v1/"))
    app.hot = hot  # POSTs answered in front of the stack below (hot_routes.py)
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


def _bind(ctx: ApiContext, endpoint: str) -> Callable[[Request], Any]:
    async def route(request: Request) -> Response:
        return await _handle(ctx, request, endpoint)

    return route


async def _handle(ctx: ApiContext, request: Request, endpoint: str) -> Response:
    """One POST of the three OpenAI routes."""
    # the scope's headers read once and its state dict written directly: Starlette's
    # `request.headers.get` scans and lower-cases every header on each call
    scope = request.scope
    state: dict[str, Any] = scope.setdefault("state", {})
    headers_in = _headers_of(scope)
    route_header = headers_in.get(_ROUTE_HEADER)
    key_id = await ctx.authenticate_header(headers_in.get(b"authorization", ""))
    state["key_id"] = key_id
    raw = await _receive_body(request.receive, headers_in.get(b"content-length"))
    parsed = parse(raw, endpoint)
    body, stream = parsed.body, parsed.stream
    request_id = (current_request_id() or headers_in.get(b"x-request-id")
                  or "req_" + secrets.token_hex(8))
    state["model"] = str(body["model"])
    route, want = await plan(ctx, parsed, route_header)
    want = _for_key(ctx, key_id, body, want, request_id=request_id, header=route_header)
    cached_as, hit = await _from_cache(ctx, request_id, key_id, endpoint, body)
    if hit is not None:
        return hit
    deadline = _deadline(ctx, headers_in.get(b"x-meshgate-timeout"))
    open_request = OpenRequest(request_id, endpoint, want.models[0], stream, raw)
    route_text = str(route) if route.task or body["model"].startswith("qg://") else None
    route_text = route_text or f"qg://prefer={want.prefer.value}"  # the policy it ran under
    state["route"] = route_text
    watch = Watch(request.receive, scope)  # the client leaving, for every wait
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
                    data, served.model, served.target, *_tokens(served.usage)))
            return _JsonAnswer(data, [(b"x-request-id", request_id.encode()),
                                      *served.raw_headers()])
        headers = {"x-request-id": request_id, **served.headers()}
        handed = True
        return EventStream(served, ctx.commit, key_id, route_text,
                           include_usage=parsed.include_usage, headers=headers, watch=watch)
    finally:
        if not handed:
            watch.stop()


async def plan(ctx: ApiContext, parsed: Parsed, header: str | None) -> tuple[Route, Want]:
    """The route and the scheduler's request: candidate models, sizes, policy."""
    body = parsed.body
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
    prompt, completion = fit_to_context(ctx, models, parsed)
    want = Want(
        models=models,
        prompt_tokens=prompt,
        max_tokens=completion,
        prefer=route.prefer,
        residency=route.residency,
    )
    return route, want


def _served_names(ctx: ApiContext) -> list[str]:
    """What a client may ask for now: models on connected nodes, cloud models, aliases."""
    names = set(ctx.registry.models()) | set(ctx.config.aliases)
    if ctx.dispatcher is not None:
        names |= {m for c in ctx.dispatcher.clouds.values() for m in c.upstream.models}
    return sorted(names)


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


def _for_key(ctx: ApiContext, key_id: str, body: dict[str, Any], want: Want, *,
             request_id: str, header: str | None) -> Want:
    """Admit the request for its key (403 out of scope, 429 rate limited) and fit the
    scheduler's request to the key's scopes and budget."""
    if ctx.gate is None:
        return want
    hint = str(body["model"]) + (header or "")
    return ctx.gate.plan(key_id, body, want, request_id=request_id,
                         explicit_prefer="prefer=" in hint.replace(" ", "").lower())


def _gauges(ctx: ApiContext) -> None:
    if ctx.metrics is not None:
        ctx.metrics.count_nodes(lambda: len(ctx.registry.nodes()))
        ctx.metrics.queue_length.set_function(
            lambda: float(ctx.dispatcher.waiting if ctx.dispatcher else 0))


async def _from_cache(ctx: ApiContext, request_id: str, key_id: str, endpoint: str,
                      body: dict[str, Any]) -> tuple[str | None, Response | None]:
    """(the request's cache key or None, the cached answer or None; its row is stored)."""
    if ctx.cache is None:
        return None, None
    cached_as = cache_key(key_id, endpoint, body)
    if cached_as is None:
        return None, None
    hit = ctx.cache.get(cached_as)
    if ctx.metrics is not None:
        (ctx.metrics.cache_hits if hit else ctx.metrics.cache_misses).inc()
    if hit is None:
        return cached_as, None
    await ctx.commit(with_status(_cache_row(request_id, key_id, endpoint, hit)))
    return cached_as, Response(hit.body, media_type="application/json", headers={
        "x-request-id": request_id, "x-meshgate-cache": "hit"})


def _tokens(usage: dict[str, int] | None) -> tuple[int, int]:
    usage = usage or {}
    return int(usage.get("prompt_tokens", 0) or 0), int(usage.get("completion_tokens", 0) or 0)


def _cache_row(request_id: str, key_id: str, endpoint: str, hit: CachedResponse
               ) -> dict[str, Any]:
    """The ledger row of an answer from the cache: no node, no cost, no tokens used."""
    return {
        "request_id": request_id, "key_id": key_id, "node_did": None, "upstream": None,
        "model": hit.model, "endpoint": endpoint, "prompt_tokens": 0, "completion_tokens": 0,
        "latency_ms": 0.0, "outcome": "cache_hit", "cost": 0.0, "route": "cache",
    }
