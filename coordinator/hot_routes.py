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

On the daemon's own server (meshgate/http_protocols.py's httptools protocol) the three
routes are answered below ASGI too (`hot_runner`, meshgate/http_hot.py): the request's
task runs `_serve` on uvicorn's request cycle directly, with no ASGI app, middleware or
Starlette ``Request`` in between, and a whole answer (a JSON body, a refusal) is written
as one head and body (`HotExchange.respond`) rather than two ASGI messages through the
wrappers. A stream, and everything on another server (tests' ASGI transport, h11), go
through ASGI as above; both ways share `_serve`, so they answer alike (tested side by side).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Message, Receive, Scope, Send

from coordinator.live_requests import InFlight, LiveRequests, note_answer, note_response
from coordinator.request_io import headers_of
from meshgate.http_hot import HotExchange, HotRunner
from meshgate.logs import (
    REQUEST_ID_HEADER,
    accept_request_id,
    access_line,
    request_id_var,
)

Handler = Callable[[Scope, Receive], Awaitable[Response]]
"""A hot route: the request's scope and ``receive`` -> its answer."""
Respond = Callable[[int, list[tuple[bytes, bytes]], bytes], Awaitable[None]]

_ID_HEADER = REQUEST_ID_HEADER.encode()
_RESPONSE_CALL = Response.__call__


class CoordinatorApp(FastAPI):
    """FastAPI, with `hot` (path -> handler, POST only) answered before its stack."""

    hot: Mapping[str, Handler] = {}
    """path -> handler (set by `set_hot`)"""
    live: LiveRequests | None = None
    """the web pane's requests in flight (set when the admin API is mounted)"""
    _runners: Mapping[str, HotRunner] = {}

    def set_hot(self, hot: Mapping[str, Handler]) -> None:
        self.hot = hot
        self._runners = {path: functools.partial(self._run_hot, handle)
                         for path, handle in hot.items()}

    def hot_runner(self, scope: Scope) -> HotRunner | None:
        """The runner of a request answered below ASGI (meshgate/http_hot.py), or None."""
        return self._runners.get(scope["path"]) if scope["method"] == "POST" else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handle = self.hot.get(scope["path"])
            if handle is not None:
                await self._serve(handle, scope, receive, send, None)
                return
        await super().__call__(scope, receive, send)

    async def _run_hot(self, handle: Handler, exchange: HotExchange) -> None:
        await self._serve(handle, exchange.scope, exchange.receive, exchange.send,
                          exchange.respond)

    async def _serve(self, handle: Handler, scope: Scope, receive: Receive, send: Send,
                     respond: Respond | None) -> None:
        """One request of a hot route; a whole answer through `respond` when given."""
        scope["app"] = self
        request_id = accept_request_id(headers_of(scope).get(_ID_HEADER))
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

        try:
            try:
                response = await handle(scope, receive)
            except Exception as exc:  # noqa: BLE001 - answered by its handler or raised again
                response = await self._answer(Request(scope, receive, send_hot), exc)
            if (respond is not None and response.background is None
                    and type(response).__call__ is _RESPONSE_CALL):  # whole: one write
                status, headers, body = _whole(response, id_value, entry)
                await respond(status, headers, body)
            else:
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


def _whole(response: Response, id_value: bytes, entry: InFlight | None
           ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A whole answer's status, headers (its request id last, as `send_hot` puts it) and
    body, noted in its live-requests entry."""
    headers = [h for h in response.raw_headers if h[0] != _ID_HEADER]
    headers.append((_ID_HEADER, id_value))
    body = bytes(response.body)  # (bytes already: the same object)
    if entry is not None:
        note_answer(entry, response.status_code, headers, body)
    return response.status_code, headers, body


async def _server_error(scope: Scope, receive: Receive, send: Send) -> None:
    """ServerErrorMiddleware's answer to an exception nobody handled (before any answer)."""
    await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)


__all__ = ["CoordinatorApp", "Handler"]
