"""The local port's hot routes as one raw ASGI layer, in front of the full app.

``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` from a
program (not a browser) are what the local port mostly serves; :class:`HotRoutes`
answers them itself, in one pass, and hands everything else to the full app (the
Starlette routes behind the request-id, access-log and guard layers). It does for
these requests exactly what those layers do, without their per-request wrappers:

- the request id (the client's ``X-Request-Id`` when sane, else a fresh one) in
  the log context, in ``scope["state"]`` and on the answer;
- the guard's Host check (DNS rebinding): a Host it does not allow goes to the
  full app, whose guard refuses it; so does any request with an ``Origin`` or a
  ``Sec-Fetch-*`` header (a browser's), which the guard checks and answers with
  CORS headers;
- the body read once, refused with 413 past the limit; validated by
  :func:`meshgate.openai.parse`; run by the :class:`~node_agent.pipeline.Pipeline`;
- errors as OpenAI error objects (``hop: node`` unless the runtime named one);
  a stream's error after it started as a last SSE error event;
- one access line per request after its last byte (:mod:`meshgate.logs`' own).

Measured on the local port against the instant fake upstream
(``scripts/bench/node_cpu.py --baseline``, interleaved): see the commit that added it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from meshgate.logs import _access_line, accept_request_id, request_id_var
from meshgate.openai import MAX_BODY_BYTES, OpenAIError, parse
from node_agent.guard import LocalGuard
from node_agent.http import JSON
from node_agent.openai_routes import SSE_HEADERS, SSEResponse
from node_agent.pipeline import Pipeline, Streamed
from node_agent.runtimes.base import Body

__all__ = ["HotRoutes"]

HOT = {"/v1/chat/completions": "chat/completions", "/v1/completions": "completions",
       "/v1/embeddings": "embeddings"}
_BROWSER = (b"origin", b"sec-fetch-site", b"sec-fetch-mode", b"sec-fetch-dest",
            b"sec-fetch-user")
_JSON_HEAD = [(b"content-type", JSON.encode())]
_SSE_HEAD = [(b"content-type", b"text/event-stream; charset=utf-8"),
             *((k.encode(), v.encode()) for k, v in SSE_HEADERS.items())]
_HOSTS_CACHED = 256


class HotRoutes:
    """`app` with the OpenAI POST routes of `pipeline` answered in front of it (module doc)."""

    def __init__(self, app: ASGIApp, pipeline: Pipeline, guard: LocalGuard) -> None:
        self.app = app
        self.pipeline = pipeline
        self.guard = guard
        self._hosts: dict[bytes, bool] = {}

    def _host_allowed(self, host: bytes) -> bool:
        allowed = self._hosts.get(host)
        if allowed is None:
            allowed = self.guard.host_allowed(host.decode("latin-1"))
            if len(self._hosts) < _HOSTS_CACHED:
                self._hosts[host] = allowed
        return allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = HOT.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        given: bytes | None = None
        declared = b""
        for name, value in scope["headers"]:  # uvicorn gives names in lower case
            if name == b"host":
                if not self._host_allowed(value):
                    await self.app(scope, receive, send)  # the guard refuses it
                    return
            elif name == b"x-request-id":
                given = value
            elif name == b"content-length":
                declared = value
            elif name in _BROWSER:
                await self.app(scope, receive, send)  # the guard's rules and CORS
                return
        given_id = given.decode("latin-1") if given is not None else None
        request_id = accept_request_id(given_id)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 499  # unless an answer started
        try:
            status = await self._answer(endpoint, scope, receive, send, declared=declared,
                                        id_header=(b"x-request-id", request_id.encode()))
        finally:
            request_id_var.reset(token)
            _access_line(scope, status, time.perf_counter() - started)

    async def _answer(self, endpoint: str, scope: Scope, receive: Receive, send: Send, *,
                      declared: bytes, id_header: tuple[bytes, bytes]) -> int:
        """Answer the request; returns the status sent."""
        state = scope["state"]
        try:
            raw = await _read_body(receive, declared)
            parsed = parse(raw, endpoint)
            body = Body(parsed.raw, parsed.body)  # decoded once: runtimes read `parsed.body`
            state["model"] = parsed.model
            if not parsed.stream:
                # sent inside the block: metered after the answer left (499 if it did not)
                async with self.pipeline.answer(endpoint, parsed.model, body,
                                                via="proxy") as done:
                    await _send_whole(send, 200, done.data, id_header)
                if done.usage:
                    state["usage"] = dict(done.usage)
                return 200
            streamed = await self.pipeline.stream(endpoint, parsed.model, body, via="proxy",
                                                  include_usage=parsed.include_usage)
        except OpenAIError as exc:
            exc.hop = exc.hop or "node"
            await _send_error(send, exc, id_header)
            return exc.status
        except Exception as exc:  # noqa: BLE001 - answered as the app's 500 would be
            error = OpenAIError(500, f"the node failed to answer: {exc!r}"[:300], hop="node")
            await _send_error(send, error, id_header)
            return 500
        await SSEResponse(streamed, _noting(state, streamed), [*_SSE_HEAD, id_header])(
            scope, receive, send)
        return 200


def _noting(state: dict[str, object], streamed: Streamed) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        try:
            await streamed.aclose()
        finally:
            state["model"] = streamed.meter.model
            if streamed.meter.usage:
                state["usage"] = dict(streamed.meter.usage)

    return close


async def _read_body(receive: Receive, declared: bytes, limit: int = MAX_BODY_BYTES) -> bytes:
    if declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"request body is {declared.decode()} bytes; the limit is {limit}")
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body  # the whole body in one message: the usual case
    parts, size = [body], len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] != "http.request":
            break
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise OpenAIError(413, f"request body exceeds the limit of {limit} bytes")
        parts.append(part)
    return b"".join(parts)


async def _send_whole(send: Send, status: int, data: bytes,
                      id_header: tuple[bytes, bytes]) -> None:
    headers = [*_JSON_HEAD, (b"content-length", str(len(data)).encode()), id_header]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _send_error(send: Send, error: OpenAIError, id_header: tuple[bytes, bytes]) -> None:
    data = json.dumps(error.body(), separators=(",", ":"), ensure_ascii=False).encode()
    await _send_whole(send, error.status, data, id_header)
