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
- the answer itself by the same :class:`~node_agent.openai_routes.OpenAIEndpoint`
  the Starlette route runs (body, validation, pipeline, JSON or SSE, OpenAI errors);
- one access line per request after its last byte (:mod:`meshgate.logs`' own).

Measured on the local port against the instant fake upstream
(``scripts/bench/node_cpu.py --baseline``, interleaved): see the commit that added it.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Receive, Scope, Send

from meshgate.logs import accept_request_id, access_line, request_id_var
from meshgate.openai import ENDPOINTS
from node_agent.guard import LocalGuard
from node_agent.openai_routes import OpenAIEndpoint
from node_agent.pipeline import Pipeline

__all__ = ["HotRoutes"]

_BROWSER = (b"origin", b"sec-fetch-site", b"sec-fetch-mode", b"sec-fetch-dest",
            b"sec-fetch-user")
_HOSTS_CACHED = 256


class HotRoutes:
    """`app` with the OpenAI POST routes of `pipeline` answered in front of it (module doc)."""

    def __init__(self, app: ASGIApp, pipeline: Pipeline, guard: LocalGuard) -> None:
        self.app = app
        self.routes = {f"/v1/{e}": OpenAIEndpoint(pipeline, e) for e in ENDPOINTS}
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
        endpoint = self.routes.get(scope["path"]) if scope["type"] == "http" else None
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
            status = await endpoint.respond(scope, receive, send, declared=declared,
                                            head=((b"x-request-id", request_id.encode()),))
        finally:
            request_id_var.reset(token)
            access_line(scope, status, time.perf_counter() - started)
