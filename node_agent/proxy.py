"""The node's local OpenAI-compatible port (127.0.0.1:11438 by default).

Bodies pass through as bytes: the proxy checks only what it needs (size,
JSON, ``model``) with :func:`meshgate.openai.parse_request` and hands the
original bytes to the model's runtime. Every error leaves as an OpenAI error
object; one that happens after a stream started leaves as a final error
event, never as a silently shortened stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import Send

from meshgate.bounds import load_json
from meshgate.openai import (
    ENDPOINTS,
    MAX_BODY_BYTES,
    SSE_DONE,
    OpenAIError,
    model_list,
    parse_request,
    sse_error,
    sse_event,
)
from node_agent.metrics import CONTENT_TYPE_LATEST, NodeMetrics, RequestTrack
from node_agent.models import ModelManager
from node_agent.ollama_api import add_ollama_routes
from node_agent.runtimes.base import Runtime
from node_agent.streaming import WatchedResponse, aclose

log = logging.getLogger(__name__)

#: A model this node does not serve -> a runtime that asks the mesh for it (None: 404 here).
MeshLookup = Callable[[str], Runtime | None]


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit`."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"request body is {declared} bytes; the limit is {limit}")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise OpenAIError(413, f"request body exceeds the limit of {limit} bytes")
        parts.append(part)
    return b"".join(parts)


class SSEResponse(WatchedResponse):
    """A runtime's stream as server-sent events, ending in ``[DONE]`` or an error event."""

    def __init__(
        self,
        first: bytes,
        chunks: AsyncIterator[bytes],
        stack: AsyncExitStack,
        track: RequestTrack | None = None,
    ) -> None:
        super().__init__(
            chunks,
            stack,
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
        self._first = first
        self._track = track
        self._end_status: int | None = None

    def _finished(self) -> None:
        if self._track is not None:
            self._track.finish(self._end_status or 499)  # no end sent: the client left

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": sse_event(self._first),
                    "more_body": True})
        status = 200
        try:
            async for chunk in self._chunks:
                if self._track is not None:
                    self._track.chunk(chunk)
                await send({"type": "http.response.body", "body": sse_event(chunk),
                            "more_body": True})
            end = SSE_DONE
        except OpenAIError as exc:
            log.warning("stream failed after it started: %s", exc.message)
            end, status = sse_error(exc), exc.status
        await send({"type": "http.response.body", "body": end, "more_body": False})
        self._end_status = status


async def _answer(
    manager: ModelManager,
    request: Request,
    endpoint: str,
    metrics: NodeMetrics | None = None,
    mesh: MeshLookup | None = None,
) -> Response:
    raw = await read_body(request)
    body = parse_request(raw, endpoint)
    track = metrics.track(str(body["model"]), "proxy", endpoint) if metrics else None
    stack = AsyncExitStack()
    streaming = False
    try:
        far = mesh(body["model"]) if mesh and not manager.serves(body["model"]) else None
        if far is not None:  # not served here: the coordinator places it elsewhere
            runtime = far
        else:
            runtime = await stack.enter_async_context(manager.use(body["model"]))
        if not body.get("stream"):
            data, usage = await runtime.complete(endpoint, raw)
            if track is not None:
                track.usage = usage
                track.finish(200)
            return Response(data, media_type="application/json")
        chunks = runtime.stream(endpoint, raw)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            raise OpenAIError(502, "runner sent an empty stream", hop="runner") from None
        except BaseException:
            await aclose(chunks)
            raise
        if track is not None:
            track.chunk(first)
        streaming = True
        return SSEResponse(first, chunks, stack.pop_all(), track)
    except OpenAIError as exc:
        if track is not None:
            track.finish(exc.status)
        raise
    except BaseException:
        if track is not None and not streaming:
            track.finish(500)
        raise
    finally:
        await stack.aclose()


def build_app(
    manager: ModelManager,
    *,
    telemetry: Callable[[], dict[str, Any] | None] | None = None,
    metrics: NodeMetrics | None = None,
    inventory: Callable[[], dict[str, Any]] | None = None,
    mesh: MeshLookup | None = None,
) -> FastAPI:
    app = FastAPI(title="meshgate node", openapi_url=None, docs_url=None, redoc_url=None)

    async def openai_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, OpenAIError)
        exc.hop = exc.hop or "node"
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse(OpenAIError(exc.status_code, str(exc.detail), hop="node").body(),
                            status_code=exc.status_code)

    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(HTTPException, http_error)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return model_list(manager.names(), owned_by="meshgate-node")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": manager.names()}

    @app.get("/meshgate/telemetry")
    async def read_telemetry() -> dict[str, Any]:
        sample = telemetry() if telemetry is not None else None
        if sample is None:
            raise OpenAIError(503 if telemetry else 404, "no telemetry sample yet", hop="node")
        return sample

    @app.get("/meshgate/inventory")
    async def read_inventory() -> dict[str, Any]:
        if inventory is None:
            raise OpenAIError(404, "this node serves no inventory here", hop="node")
        return inventory()

    @app.get("/metrics")
    async def read_metrics() -> Response:
        if metrics is None:
            raise OpenAIError(404, "this node serves no metrics here", hop="node")
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def route(endpoint: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            return await _answer(manager, request, endpoint, metrics, mesh)

        return handler

    for endpoint in ENDPOINTS:
        app.add_api_route(f"/v1/{endpoint}", route(endpoint), methods=["POST"])
    add_ollama_routes(app, manager, metrics, mesh)  # /api/chat, /api/generate, /api/tags...
    _add_admin_routes(app, manager)
    return app


def _add_admin_routes(app: FastAPI, manager: ModelManager) -> None:
    """``POST /meshgate/{swap,load,unload}``: the manager's commands on the local port.

    Bodies: swap ``{"model": OLD, "to": NAME=PATH.gguf | inventory name, "n_ctx"?,
    "n_gpu_layers"?}``; load ``{"model", "from"?, "n_ctx"?, "n_gpu_layers"?, "keep_alive"?}``;
    unload ``{"model"}``. The answer is what the manager reports; errors are OpenAI errors.
    Only clients on this box may ask (403 otherwise, even when the port listens wider).
    """

    def admin(op: str) -> Callable[[Request], Awaitable[dict[str, Any]]]:
        async def handler(request: Request) -> dict[str, Any]:
            host = request.client.host if request.client else ""
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise OpenAIError(403, f"/meshgate/{op} is for clients on this box only",
                                  hop="node")
            try:
                body = load_json(await read_body(request) or b"{}")
            except ValueError as exc:
                raise OpenAIError(400, f"the body must be a JSON object: {exc}",
                                  hop="node") from None
            if not isinstance(body, dict):
                raise OpenAIError(400, "the body must be a JSON object", hop="node")
            return await manager.command({**body, "op": op})

        return handler

    for op in ("swap", "load", "unload"):
        app.add_api_route(f"/meshgate/{op}", admin(op), methods=["POST"])
