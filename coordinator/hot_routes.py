"""The three routes every client calls, served without Starlette's routing and wrapping.

``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` are nearly all
of a coordinator's traffic. Through FastAPI each one passes its exception middleware,
an exit-stack middleware, the router's path matching over every route (the admin API's
included), Starlette's request/response wrapper and a second exception wrapper before
the handler runs: about 5% of the coordinator's CPU time for a request (py-spy, issue 13).
:class:`HotRoutes` is the innermost of the app's own middleware: it sends those three
straight to their handler and everything else on down the stack, so the middleware above
it (request id, access line, live requests, body limit, server errors) still sees every
request, and the routes stay in the router too (a GET there is still a 405).

An exception the handler raises before its response exists is answered by the app's
exception handler for it, looked up when it happens (the refusals' OpenAI errors with
their ledger row and metric, and the store-outage 503 added after the app is built), as
Starlette's exception middleware would; one with no handler goes up to the server-error
middleware, as before.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]


class HotRoutes:
    """Pure ASGI: `routes` (path -> handler) for POST, straight; the rest to `app`."""

    def __init__(self, app: ASGIApp, routes: Mapping[str, Handler],
                 handlers: Callable[[], Mapping[Any, Any]]) -> None:
        self.app = app
        self.routes = dict(routes)
        self.handlers = handlers
        """the app's exception handlers (read at each failure: some are added later)"""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handle = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if handle is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await handle(request)
        except Exception as exc:  # noqa: BLE001 - answered by its handler or raised again
            response = await self._answer(request, exc)
        await response(scope, receive, send)

    async def _answer(self, request: Request, exc: Exception) -> Response:
        """The app's own answer to `exc` (raised again when it has none)."""
        handlers = self.handlers()
        for cls in type(exc).__mro__:
            handler = handlers.get(cls)
            if handler is not None and cls is not Exception:
                break
        else:
            raise exc
        if inspect.iscoroutinefunction(handler):
            response: Response = await handler(request, exc)
        else:
            response = await run_in_threadpool(handler, request, exc)
        exc.__traceback__ = None  # as Starlette does: no reference cycle through the frames
        return response
