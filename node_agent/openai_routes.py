"""OpenAI's API on the node's local port: framing only (JSON answers, SSE streams).

``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` read the body
once, validate it against OpenAI's schema with :func:`meshgate.openai.parse` (decoded
once in this process) and hand the original bytes to the
:class:`~node_agent.pipeline.Pipeline` (local runtime or mesh); the access line gets the
model and, once the answer is done, its usage. A stream is server-sent events ending in
``data: [DONE]``; its usage chunk (empty ``choices``) is sent only when the client set
``stream_options.include_usage``, as OpenAI does. An error after a stream started leaves
as a final error event, never as a silently shortened stream. ``GET /v1/models`` lists
what this node serves and ``GET /v1/models/{id}`` answers one model or a 404 in OpenAI's
shape.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Send

from meshgate.openai import (
    ENDPOINTS,
    SSE_DONE,
    OpenAIError,
    model_list,
    parse,
    sse_error,
    unknown_model,
)
from node_agent.http import JSON, WatchedResponse, json_response, note, noted_close, read_body
from node_agent.pipeline import Pipeline, Streamed
from node_agent.runtimes.base import Body

__all__ = ["OWNED_BY", "SSE_HEADERS", "SSEResponse", "openai_routes"]

OWNED_BY = "meshgate-node"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class SSEResponse(WatchedResponse):
    """A started stream as server-sent events: each chunk as an event, then ``[DONE]`` in
    the body's last message; a failure mid-stream as a last error event instead. Framed
    as it is sent (no generator between the stream and the send)."""

    def __init__(self, streamed: Streamed, close: Callable[[], Awaitable[None]],
                 raw_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(streamed, close, media_type="text/event-stream", headers=SSE_HEADERS)
        if raw_headers is not None:
            self.raw_headers = raw_headers

    async def _pump(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async for chunk in self._parts:
                await send({"type": "http.response.body", "body": b"data: " + chunk + b"\n\n",
                            "more_body": True})
            tail = SSE_DONE
        except OpenAIError as exc:
            tail = sse_error(exc)
        await send({"type": "http.response.body", "body": tail, "more_body": False})


def _answer(pipeline: Pipeline, endpoint: str) -> Callable[[Request], Any]:
    async def handler(request: Request) -> Response:
        parsed = parse(await read_body(request), endpoint)
        raw = Body(parsed.raw, parsed.body)  # decoded once: runtimes read `parsed.body`
        note(request, parsed.model)
        if not parsed.stream:
            data, usage = await pipeline.complete(endpoint, parsed.model, raw, via="proxy")
            note(request, parsed.model, usage)
            return Response(data, media_type=JSON)
        streamed = await pipeline.stream(
            endpoint, parsed.model, raw, via="proxy", include_usage=parsed.include_usage
        )
        return SSEResponse(streamed, noted_close(request, streamed))

    return handler


def openai_routes(pipeline: Pipeline) -> list[BaseRoute]:
    """The OpenAI routes, serving `pipeline`'s models."""
    manager = pipeline.manager

    async def models(_: Request) -> Response:
        return json_response(model_list(manager.names(), owned_by=OWNED_BY))

    async def one_model(request: Request) -> Response:
        model = request.path_params["model"]
        if not manager.serves(model):
            raise unknown_model(model, hop="node")
        return json_response({"id": model, "object": "model", "created": 0, "owned_by": OWNED_BY})

    routes: list[BaseRoute] = [
        Route(f"/v1/{endpoint}", _answer(pipeline, endpoint), methods=["POST"])
        for endpoint in ENDPOINTS
    ]
    routes.append(Route("/v1/models", models, methods=["GET"]))
    routes.append(Route("/v1/models/{model:path}", one_model, methods=["GET"]))
    return routes
