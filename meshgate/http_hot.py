"""Requests an app answers below ASGI (on meshgate/http_protocols.py's httptools protocol).

An app with a ``hot_runner(scope)`` method (the coordinator's
:class:`~coordinator.hot_routes.CoordinatorApp`) is asked, for each request whose head
has been parsed, whether it answers it itself: ``None`` sends the request through the ASGI
app as before; a runner is started in the request's task in place of uvicorn's
``run_asgi(app)`` and is handed a :class:`HotExchange`. Nothing else of uvicorn's request
cycle changes: the body still arrives through the cycle (``receive``, flow control, a
client gone), pipelined requests still wait their turn, keep-alive and ``connection:
close`` are the cycle's, and :func:`run_hot` does on an error what ``run_asgi`` does.

What the runner skips is the ASGI app's stack (uvicorn's proxy-headers middleware, which
only rewrites ``client`` and ``scheme``: the hot routes read neither; the app's middleware
and router; a Starlette ``Request``) and, for a whole answer, the two ASGI ``send`` calls:
:meth:`HotExchange.respond` writes the head and body as uvicorn's ``send`` would (the
server's default headers first, ``connection: close`` when the connection ends, the
same header checks), in one write. A streamed answer, or any ASGI response, still goes
through ``send`` (the cycle's own, unwrapped).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from starlette.types import Receive, Send
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from meshgate.cork import CorkedTransport

__all__ = ["HotExchange", "HotRunner", "run_hot"]

HotRunner = Callable[["HotExchange"], Awaitable[None]]
"""Answers one request (see the module doc)."""

_CONTENT_LENGTH = b"content-length"
_CONNECTION = b"connection"


class HotExchange:
    """One request's cycle, for a runner: the ASGI ``scope``/``receive``/``send`` of the
    request (uvicorn's own, no middleware) and `respond` for a whole answer."""

    __slots__ = ("cycle", "receive", "scope", "send")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self.cycle = cycle
        self.scope: Any = cycle.scope
        self.receive = cast("Receive", cycle.receive)
        self.send = cast("Send", cycle.send)

    @property
    def started(self) -> bool:
        """Whether the answer's head was written (or handed to ``send``)."""
        return self.cycle.response_started

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]],
                      body: bytes) -> None:
        """Write a whole answer: `status`, `headers` (lower-case names; a content-length
        among them is replaced by the body's own) and `body`, as uvicorn's ``send`` writes
        ``http.response.start`` and one ``http.response.body`` (nothing if the client left)."""
        cycle = self.cycle
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected:
            return
        if cycle.response_started:
            raise RuntimeError("Expected ASGI message 'http.response.start', but got "
                               "'http.response.body'.")
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        if cycle.access_log:  # uvicorn's own access line, when it is on
            scope = cycle.scope
            cycle.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(scope),
                                     scope["method"], get_path_with_query_string(scope),
                                     scope["http_version"], status)
        content = [STATUS_LINE[status]]
        for name, value in cycle.default_headers:
            content += (name, b": ", value, b"\r\n")
        _add_headers(cycle, headers, content)
        if not cycle.keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body)
        data = b"".join(content)
        transport: Any = cycle.transport  # a CorkedTransport on our protocol
        if type(transport) is CorkedTransport:
            transport.write_last(data)  # the whole answer: no turn of the loop held
        else:
            transport.write(data)
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()


def _add_headers(cycle: RequestResponseCycle, headers: list[tuple[bytes, bytes]],
                 content: list[bytes]) -> None:
    """`headers` (but a content-length) onto `content`, checked as uvicorn's ``send`` checks
    them; a ``connection: close`` among them ends the connection after the answer."""
    names: list[bytes] = []
    values: list[bytes] = []
    for name, value in headers:
        if name == _CONTENT_LENGTH:
            continue
        if name == _CONNECTION and b"close" in value.lower():
            cycle.keep_alive = False
        names.append(name)
        values.append(value)
        content += (name, b": ", value, b"\r\n")
    # each of uvicorn's patterns is one character class: one search over all the names and
    # one over all the values find what a search of each would
    if HEADER_RE.search(b"".join(names)) or HEADER_VALUE_RE.search(b"".join(values)):
        _refuse(names, values)


def _refuse(names: list[bytes], values: list[bytes]) -> None:
    """uvicorn's error for the first bad header, as its ``send`` raises it."""
    for name, value in zip(names, values, strict=True):
        if HEADER_RE.search(name):
            raise RuntimeError("Invalid HTTP header name.")
        if HEADER_VALUE_RE.search(value):
            raise RuntimeError("Invalid HTTP header value.")


async def run_hot(runner: HotRunner, exchange: HotExchange, logger: logging.Logger) -> None:
    """`runner` on `exchange`, with what uvicorn's ``run_asgi`` does when an app fails: an
    exception is logged and answered 500 (the connection closed, if the answer began); an
    answer never begun is a 500, one never ended closes the connection."""
    cycle = exchange.cycle
    try:
        await runner(exchange)
    except BaseException as exc:
        logger.error("unhandled error answering %s %s", cycle.scope["method"],
                     cycle.scope["path"], exc_info=exc)
        if not cycle.response_started:
            await cycle.send_500_response()
        else:
            cycle.transport.close()
    else:
        if not cycle.response_started and not cycle.disconnected:
            logger.error("ASGI callable returned without starting response.")
            await cycle.send_500_response()
        elif not cycle.response_complete and not cycle.disconnected:
            logger.error("ASGI callable returned without completing response.")
            cycle.transport.close()
    finally:
        cycle.on_response = lambda: None
