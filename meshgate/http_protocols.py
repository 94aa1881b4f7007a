"""uvicorn's two HTTP/1.1 protocols with the bounds of :mod:`meshgate.httpserver` added.

:class:`GuardedHttpToolsProtocol` (the default: uvicorn's ``httptools`` protocol,
llhttp's C parser) and :class:`~meshgate.http_h11.GuardedH11Protocol` (uvicorn's
pure-Python ``h11`` protocol, imported only when asked for) share one :class:`Guards`
mixin: head, body and write timeouts and the connection cap with eviction, as the
module doc of :mod:`meshgate.httpserver` says.
They differ only in how they tell where a request is (h11's ``their_state``; the
httptools parser's callbacks here) and in the head size limit: h11 counts its
receive buffer; llhttp has no limit of its own, so here the bytes that arrive
while a head is awaited are counted (a head that never ends cannot grow past the
limit plus one read) and so are the URL and headers the parser hands over. A head
over the limit is answered 400 and the connection closed, by either.

The httptools one also lets an app answer requests below ASGI (:mod:`meshgate.http_hot`:
an app's ``hot_runner(scope)``), and puts a :class:`ClientGone` in every request's scope
(``CLIENT_GONE``):
callbacks for the connection's loss, so an app that must notice a client leaving
(the coordinator's answers) needs no task waiting on ``receive`` for it.

Both write through a :class:`CorkedTransport`: what the app sends within one turn
of the event loop (a response's head and body, the chunks of a stream that came
in one read) leaves in one ``send()`` rather than one each, at most 64 KiB held;
a response's end leaves at once (what the app does after it, such as writing its
access line, is not on the client's path).
On loopback each ``send()`` is a trip through the kernel's TCP stack and a wake-up
of the reader, so this is most of what a small answer costs to write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from meshgate.cork import CORK_MAX_BYTES, CorkedTransport
from meshgate.http_hot import HotExchange, HotRunner, run_hot
from meshgate.httplimits import HttpLimits

__all__ = ["CLIENT_GONE", "CORK_MAX_BYTES", "SSE_CORK", "ClientGone", "CorkedTransport",
           "GuardedHttpToolsProtocol", "Guards"]

log = logging.getLogger("meshgate.httpserver")

#: The scope key of a request's :class:`ClientGone` (httptools protocol only; absent: none).
CLIENT_GONE = "meshgate.client_gone"
#: The scope key of the connection's :class:`CorkedTransport` (httptools protocol only): a
#: streamed response that writes once a burst itself uncorks it after its first write (a
#: ``call_soon`` and a flush a write less).
SSE_CORK = "meshgate.cork"


class ClientGone:
    """Callbacks for the end of one client connection, in each request's scope under
    `CLIENT_GONE`: an app learns that its client left without a task waiting on ``receive``
    (one task per request fewer, and no loop turn between the loss and the callback)."""

    __slots__ = ("_callbacks", "lost")

    def __init__(self) -> None:
        self.lost = False
        self._callbacks: list[Callable[[], None]] = []

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` once when the connection is lost (now, if it was)."""
        if self.lost:
            callback()
        else:
            self._callbacks.append(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def fire(self) -> None:
        self.lost = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one app's bug must not keep the others from hearing
                log.exception("a client-gone callback failed")


class Guards:
    """Timeouts and the connection cap, for a uvicorn HTTP protocol (mixed in before it)."""

    limits = HttpLimits()
    #: connections waiting for a request head, oldest first (one dict per server)
    waiting: dict[Guards, None] = {}  # noqa: RUF012 - per server, see server_config
    refused_connections = 0
    evicted_connections = 0

    # what the uvicorn protocol provides
    loop: asyncio.AbstractEventLoop
    transport: Any
    connections: set[Any]
    client: tuple[str, int] | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._refused = False

    # where the request is: the protocol says
    def awaiting_head(self) -> bool:
        raise NotImplementedError

    def reading_body(self) -> bool:
        raise NotImplementedError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)
        if len(self.connections) >= self.limits.max_connections and not self._evict_one():
            self._refused = True
            type(self).refused_connections += 1
            log.warning("connection cap reached (%d open, all with requests in flight): "
                        "closing new connections until some end", self.limits.max_connections)
            transport.abort()
            return
        super().connection_made(CorkedTransport(transport, self.loop))  # type: ignore[misc]
        self._wait_for_head()

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for a request head; False if none."""
        for victim in self.waiting:
            del self.waiting[victim]
            type(self).evicted_connections += 1
            log.warning("connection cap reached (%d open): closing the one that waited "
                        "longest for a request", self.limits.max_connections)
            victim._cancel_timers()
            self.connections.discard(victim)
            victim.transport.abort()
            return True
        return False

    def _wait_for_head(self) -> None:
        self.waiting[self] = None
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._too_slow,
                                                    "request head")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self.waiting.pop(self, None)
        self._cancel_timers()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)  # type: ignore[misc]
        if self.awaiting_head():
            if self._head_timer is None and not self.transport.is_closing():
                # a kept-alive connection's next head began and is not whole yet: its clock
                # starts with its first bytes (a head that came whole needs no timer)
                self._wait_for_head()
        else:
            self.waiting.pop(self, None)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if self.reading_body() and not self.transport.is_closing():
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._too_slow,
                                                    "request body")

    def on_response_complete(self) -> None:
        if isinstance(self.transport, CorkedTransport):
            self.transport.flush()  # the answer's last bytes leave now, before the app's epilogue
            self.transport.corked = True  # the next response on this connection: corked again
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing() and self.awaiting_head():
            self.waiting[self] = None  # idle, kept alive: first to go when the cap is reached

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.write_timeout_s,
                                                     self._not_reading)

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().resume_writing()  # type: ignore[misc]

    def _who(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"

    def _not_reading(self) -> None:
        self._write_timer = None
        if self.transport.is_closing():
            return
        log.info("closing the connection of %s: it read nothing of its answer for %g s",
                 self._who(), self.limits.write_timeout_s)
        self.transport.abort()  # close() would wait for the buffer to drain: never

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._write_timer = None

    def _too_slow(self, what: str) -> None:
        self._head_timer = self._body_timer = None
        if self.transport.is_closing():
            return
        limit = (self.limits.head_timeout_s if what == "request head"
                 else self.limits.body_timeout_s)
        log.info("closing the connection of %s: its %s took more than %g s", self._who(), what,
                 limit)
        self.transport.close()


def _waits_for_body(cycle: RequestResponseCycle, declared: bytes | None) -> bool:
    """Whether a hot request's task is started only once its body is in (`on_message_complete`)
    rather than at its head: a body of a `declared` length that uvicorn takes whole without
    the app reading it (at most its high-water mark), and no ``Expect: 100-continue`` (the
    client waits for the app's first read). A client writes the head and the body apart
    (httpx, the OpenAI SDK), so the body is usually in the socket already, and read by the
    loop's next poll, when the head has been parsed: started then, the task runs
    from the head to the node without waiting for the body, and nothing else runs before
    that poll. A client gone before the body ended starts it too (`connection_lost`)."""
    return (not cycle.waiting_for_100_continue and declared is not None and declared.isdigit()
            and int(declared) <= HIGH_WATER_LIMIT)


class HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops and uvicorn answers 400."""


_HEAD, _BODY, _DONE = "head", "body", "done"
_CONTENT_LENGTH = b"content-length"
class GuardedHttpToolsProtocol(Guards, HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded; the head's size is counted here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _HEAD
        self._head_bytes = 0  # of the URL and headers parsed
        self._raw_head_bytes = 0  # received since the last head or message ended
        self._gone = ClientGone()
        # the app's runner for requests it answers below ASGI (meshgate/http_hot.py)
        self._hot = getattr(self.config.app, "hot_runner", None)
        # a hot request whose task starts once its body is in (`_waits_for_body`)
        self._deferred: tuple[RequestResponseCycle, HotRunner] | None = None
        self._declared: bytes | None = None  # the content-length of the head parsed last

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._gone.fire()
        if self._deferred is not None:  # it hears of the loss as a request mid-body does
            self._start_deferred()

    def data_received(self, data: bytes) -> None:
        if self._phase != _BODY:
            self._raw_head_bytes += len(data)
        super().data_received(data)
        if (self._phase == _HEAD and self._raw_head_bytes > self.limits.max_head_bytes
                and not self.transport.is_closing()):
            self.send_400_response("Invalid HTTP request received.")

    def awaiting_head(self) -> bool:
        if self._phase == _HEAD:
            return True
        return self._phase == _DONE and (self.cycle is None or self.cycle.response_complete)

    def reading_body(self) -> bool:
        return self._phase == _BODY

    def _too_large(self) -> HeadTooLarge:
        return HeadTooLarge(f"request head over {self.limits.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        self._phase = _HEAD
        self._head_bytes = 0
        self._declared = None
        super().on_message_begin()
        self.scope[CLIENT_GONE] = self._gone  # type: ignore[literal-required]
        self.scope[SSE_CORK] = self.transport  # type: ignore[literal-required]

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self.limits.max_head_bytes:
            raise self._too_large()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:  # once a header: kept lean
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.limits.max_head_bytes:
            raise self._too_large()
        # uvicorn's own on_header, in this one call (one Python call a header fewer)
        name = name.lower()
        if name == _CONTENT_LENGTH:
            if self._declared is None:
                self._declared = value
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._raw_head_bytes = 0
        super().on_headers_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        runner = self._hot(cycle.scope) if self._hot is not None else None
        if runner is None or app is not self.app or self.config.reset_contextvars:
            # (not self.app: refused, a 503; reset_contextvars: uvicorn's own way)
            super()._start_asgi_task(cycle, app)
            return
        # (a pipelined request started later is its head's, the last parsed, while its
        # body is not all in: `_declared` is its content-length)
        if cycle.more_body and cycle is self.cycle and _waits_for_body(cycle, self._declared):
            self._deferred = (cycle, runner)  # started once its body is in
            return
        self._run_hot(cycle, runner)

    def _run_hot(self, cycle: RequestResponseCycle, runner: HotRunner) -> None:
        # its errors in our log ("meshgate.httpserver"): uvicorn's own logger does not
        # reach it where uvicorn's log config was applied (propagate off)
        task = self.loop.create_task(run_hot(runner, HotExchange(cycle), log))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _start_deferred(self) -> None:
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            self._run_hot(*deferred)

    def on_message_complete(self) -> None:
        self._phase = _DONE
        self._raw_head_bytes = 0
        super().on_message_complete()
        if self._deferred is not None:
            self._start_deferred()
