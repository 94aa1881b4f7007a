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

import json
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from meshgate.openai import (
    ENDPOINTS,
    SSE_DONE,
    OpenAIError,
    model_list,
    parse,
    sse_error,
    unknown_model,
)
from node_agent.http import (
    JSON,
    WatchedResponse,
    json_response,
    note,
    noted_close,
    read_raw_body,
)
from node_agent.pipeline import Pipeline, Streamed
from node_agent.runtimes.base import Body

__all__ = ["OWNED_BY", "SSE_HEADERS", "OpenAIEndpoint", "SSEResponse", "openai_routes"]

OWNED_BY = "meshgate-node"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_JSON_HEAD = [(b"content-type", JSON.encode())]
_SSE_HEAD = [(b"content-type", b"text/event-stream; charset=utf-8"),
             *((k.encode(), v.encode()) for k, v in SSE_HEADERS.items())]


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


class OpenAIEndpoint:
    """``POST /v1/{endpoint}`` of `pipeline` as a raw ASGI app, the one answer behind both
    front doors: the Starlette route (behind the guard, request-id and access-log layers)
    and :class:`~node_agent.hot_routes.HotRoutes`. The body is read once (413 past the
    limit) and validated once; a whole answer is sent inside the pipeline's block, so it is
    metered after it left (499 if it did not); a stream leaves as SSE. Every failure before
    the answer starts is an OpenAI error (``hop: node`` unless the runtime named one). The
    model and usage go in ``scope["state"]`` for the access line."""

    def __init__(self, pipeline: Pipeline, endpoint: str) -> None:
        self.pipeline = pipeline
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        await self.respond(scope, receive, send, declared=declared)

    async def respond(self, scope: Scope, receive: Receive, send: Send, *, declared: bytes,
                      head: tuple[tuple[bytes, bytes], ...] = ()) -> int:
        """Answer the request (`head`: more headers for the answer); returns its status."""
        try:
            parsed = parse(await read_raw_body(receive, declared), self.endpoint)
            body = Body(parsed.raw, parsed.body)  # decoded once: runtimes read `parsed.body`
            note(scope, parsed.model)
            if not parsed.stream:
                async with self.pipeline.answer(self.endpoint, parsed.model, body,
                                                via="proxy") as done:
                    await _send_whole(send, 200, done.data, head)
                note(scope, parsed.model, done.usage)
                return 200
            streamed = await self.pipeline.stream(self.endpoint, parsed.model, body,
                                                  via="proxy",
                                                  include_usage=parsed.include_usage)
        except OpenAIError as exc:
            exc.hop = exc.hop or "node"
            await _send_error(send, exc, head)
            return exc.status
        except Exception as exc:  # noqa: BLE001 - answered as the app's 500 would be
            error = OpenAIError(500, f"the node failed to answer: {exc!r}"[:300], hop="node")
            await _send_error(send, error, head)
            return 500
        await SSEResponse(streamed, noted_close(scope, streamed), [*_SSE_HEAD, *head])(
            scope, receive, send)
        return 200


async def _send_whole(send: Send, status: int, data: bytes,
                      head: tuple[tuple[bytes, bytes], ...]) -> None:
    headers = [*_JSON_HEAD, (b"content-length", str(len(data)).encode()), *head]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _send_error(send: Send, error: OpenAIError,
                      head: tuple[tuple[bytes, bytes], ...]) -> None:
    data = json.dumps(error.body(), separators=(",", ":"), ensure_ascii=False).encode()
    await _send_whole(send, error.status, data, head)


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
        Route(f"/v1/{endpoint}", OpenAIEndpoint(pipeline, endpoint), methods=["POST"])
        for endpoint in ENDPOINTS
    ]
    routes.append(Route("/v1/models", models, methods=["GET"]))
    routes.append(Route("/v1/models/{model:path}", one_model, methods=["GET"]))
    return routes
