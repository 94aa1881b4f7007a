"""The three routes every client calls, answered in front of FastAPI's whole stack.

``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` are nearly all
of a coordinator's traffic. Through FastAPI each one passed nine ASGI layers before its
handler (FastAPI's and Starlette's ``__call__``, the server-error, telemetry and
body-limit middleware, the live-requests tracker, the request id, the access line and the
router with its two exception wrappers), and each message of its answer four ``send``
wrappers on the way out. :class:`CoordinatorApp` is the FastAPI app with those three
routes taken first, in one layer that does what the layers did for them:

- the request id (``x-request-id`` kept when sane, else a new one; in the log context,
  the request's state and the answer's header), as ``RequestIdMiddleware``;
- the live-requests entry (status, node or cloud, chunks), as ``LiveRequestsMiddleware``;
- an exception the handler raises before its answer exists answered by the app's
  exception handler for it, looked up when it happens (the refusals' OpenAI errors with
  their ledger row and metric, the store-outage 503 added after the app was built), as
  Starlette's exception middleware; one with no handler answered ``500 Internal Server
  Error`` and raised on to the server (which logs it), as ``ServerErrorMiddleware``;
- the access line once the answer has been sent, as ``AccessLogMiddleware``.

Every other request (another method on these paths, a 405, the admin API, the pane)
goes through FastAPI's stack as before; the routes stay in the router too.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Message, Receive, Scope, Send

from coordinator.live_requests import LiveRequests, note_response
from meshgate.logs import (
    REQUEST_ID_HEADER,
    accept_request_id,
    access_line,
    given_request_id,
    request_id_var,
)

Handler = Callable[[Request], Awaitable[Response]]

_ID_HEADER = REQUEST_ID_HEADER.encode()


class CoordinatorApp(FastAPI):
    """FastAPI, with `hot` (path -> handler, POST only) answered before its stack."""

    hot: Mapping[str, Handler] = {}
    """path -> handler (set by build_app)"""
    live: LiveRequests | None = None
    """the web pane's requests in flight (set when the admin API is mounted)"""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handle = self.hot.get(scope["path"])
            if handle is not None:
                await self._hot(handle, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _hot(self, handle: Handler, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self
        request_id = accept_request_id(given_request_id(scope["headers"]))
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        live = self.live
        ident = live.begin(scope["path"], state) if live is not None else None
        entry = live.get(ident) if live is not None and ident is not None else None
        status = 0  # no answer begun
        id_value = request_id.encode()

        async def send_hot(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [h for h in message.get("headers", []) if h[0].lower() != _ID_HEADER]
                headers.append((_ID_HEADER, id_value))
                message = {**message, "headers": headers}
            if entry is not None:
                note_response(entry, message)
            await send(message)

        request = Request(scope, receive, send_hot)
        try:
            try:
                response = await handle(request)
            except Exception as exc:  # noqa: BLE001 - answered by its handler or raised again
                response = await self._answer(request, exc)
            await response(scope, receive, send_hot)
        except Exception:
            if not status:  # nothing sent yet: a 500, and the server logs the exception
                await _server_error(scope, receive, send_hot)
            raise
        except BaseException:  # cancelled: the client went away
            status = status or 499
            raise
        finally:
            if live is not None and ident is not None:
                live.end(ident)
            access_line(scope, status, time.perf_counter() - started)
            request_id_var.reset(token)

    async def _answer(self, request: Request, exc: Exception) -> Response:
        """The app's own answer to `exc` (raised again when it has none)."""
        handlers: Mapping[Any, Any] = self.exception_handlers
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


async def _server_error(scope: Scope, receive: Receive, send: Send) -> None:
    """ServerErrorMiddleware's answer to an exception nobody handled (before any answer)."""
    await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)


__all__ = ["CoordinatorApp", "Handler"]
