"""The coordinator's public OpenAI-compatible API.

`Authorization: Bearer KEY` on every route but `/healthz`; the body goes down
a node's tunnel unchanged and the answer streams back as SSE. Errors have
OpenAI's shape: 401 for a missing or wrong key, 400 for a malformed body, 413
for an oversize one, 404 for a model that no node has ever offered, 503 when
the model exists but no connected node can serve it now.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from coordinator import dispatch
from coordinator.registry import Registry
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
        model: str = body["model"]
        stream = bool(body.get("stream", False))
        request_id = request.headers.get("x-request-id") or "req_" + secrets.token_hex(8)
        if not ctx.registry.serving(model):
            known = await asyncio.to_thread(ctx.known_models)
            if model not in known:
                raise unknown_model(model, hop="coordinator")
        open_request = OpenRequest(request_id, endpoint, model, stream, raw)
        attempt = await dispatch.start(ctx.registry, open_request)
        headers = {"x-request-id": request_id, "x-meshgate-node": attempt.node.did}
        if not stream:
            try:
                data = await attempt.collect()
            finally:
                ctx.record(dispatch.usage_row(attempt, key_id))
            return Response(data, media_type="application/json", headers=headers)
        return StreamingResponse(
            _sse(attempt, ctx, key_id), media_type="text/event-stream", headers=headers
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


async def _sse(attempt: dispatch.Attempt, ctx: ApiContext, key_id: str) -> AsyncIterator[bytes]:
    try:
        yield sse_event(attempt.first)
        async for chunk in attempt.rest():
            yield sse_event(chunk)
        yield SSE_DONE
    except OpenAIError as exc:
        log.warning("request %s ended with an error after it started: %s",
                    attempt.request.request_id, exc.message)
        yield sse_error(exc)
    finally:
        with anyio.CancelScope(shield=True):
            await attempt.close()
            ctx.record(dispatch.usage_row(attempt, key_id))
