"""An answer on its way to the client: SSE writing, and noticing a client that left.

Both are event-driven. A client that disconnects cancels the request's own task, which
turns the cancellation into a 499 (before the answer started) or ends the stream quietly
(after): the server's connection-lost callback does it (meshgate/http_protocols.py's
`ClientGone`, no task), or, on a server without it, one task per request waiting on the
ASGI ``receive``. Nothing polls, and nothing runs per frame but the write itself.

:class:`EventStream` is the streamed answer's response: no task group and no second
task per stream (Starlette's ``StreamingResponse`` runs both under ASGI 2.3); the
events that arrived together leave in one write; the ledger row is stored before the
last events and ``[DONE]`` (which leave together, and end the response in the same
write) so a crash after an answer was delivered loses no row (issue 9).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from coordinator.refusals import with_status
from coordinator.served import Served
from coordinator.write_tick import WRITE_TICK
from meshgate.http_protocols import CLIENT_GONE, SSE_CORK, ClientGone, CorkedTransport
from meshgate.lag_tick import LagTick
from meshgate.openai import SSE_DONE, OpenAIError, is_usage_only, sse_error

log = logging.getLogger(__name__)


async def client_gone(receive: Receive) -> None:
    """Return once the client has disconnected (the request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Watch:
    """Cancels the request's task when the client goes away, while armed.

    One watch per request, however many waits it guards: the API arms it around
    dispatch and again around the answer (``with watch:`` turns our cancellation into a
    499; the SSE writer arms it itself and ends quietly); `stop` once the request is done.
    It hears of the loss from the server's `ClientGone` callbacks when the scope has them
    (our httptools protocol: no task), else from one waiter task on ``receive``.
    """

    def __init__(self, receive: Receive, scope: Scope | None = None) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.gone = False
        self.armed = False
        self._cancelled = False
        self._waiter: asyncio.Task[None] | None = None
        self._hooks: ClientGone | None = scope.get(CLIENT_GONE) if scope is not None else None
        if self._hooks is not None:
            self._hooks.watch(self._lost)
        else:
            self._waiter = asyncio.get_running_loop().create_task(client_gone(receive))
            self._waiter.add_done_callback(self._fired)

    def _fired(self, waiter: asyncio.Task[None]) -> None:
        if waiter.cancelled() or waiter.exception() is not None:
            return
        self._lost()

    def _lost(self) -> None:
        self.gone = True
        if self.armed:  # the task waits inside an armed stretch: the cancel lands there
            self._cancelled = True
            self.task.cancel()

    def arm(self) -> None:
        """Watch the next waits; a client gone already is a 499 at once."""
        if self.gone:
            raise OpenAIError(499, "client closed the request", hop="coordinator")
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def caught(self) -> bool:
        """Whether a CancelledError being handled is ours (then it is taken back)."""
        if not self._cancelled:
            return False
        self._cancelled = False
        return self.task.uncancel() == 0

    def stop(self) -> None:
        self.armed = False
        if self._hooks is not None:
            self._hooks.unwatch(self._lost)
        if self._waiter is not None:
            self._waiter.remove_done_callback(self._fired)
            self._waiter.cancel()

    def __enter__(self) -> Watch:
        self.arm()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        self.armed = False
        if kind is not None and issubclass(kind, asyncio.CancelledError) and self.caught():
            raise OpenAIError(499, "client closed the request", hop="coordinator") from None


@contextlib.asynccontextmanager
async def unless_disconnected(receive: Receive, scope: Scope | None = None
                              ) -> AsyncIterator[None]:
    """Run the body; if the client goes away first, cancel it and raise a 499 (a watch of
    its own: see `Watch` for one that guards several waits)."""
    watch = Watch(receive, scope)
    try:
        with watch:
            yield
    finally:
        watch.stop()


Commit = Callable[[dict[str, Any]], Awaitable[None]]


class EventStream(Response):
    """A streamed answer as SSE (see the module doc)."""

    media_type = "text/event-stream"

    def __init__(self, served: Served, commit: Commit, key_id: str, route: str | None, *,
                 include_usage: bool, headers: dict[str, str], watch: Watch | None = None
                 ) -> None:
        self.served = served
        self.watch = watch
        """the request's watch, handed over (stopped here); None: one of its own"""
        self.commit = commit
        self.key_id = key_id
        self.route = route
        self.include_usage = include_usage
        self.status_code = 200
        self.held = b""
        self.cork: CorkedTransport | None = None
        self.tick: LagTick = WRITE_TICK
        self._resume: asyncio.Future[None] | None = None  # set while waiting for the tick
        self.background: BackgroundTask | None = None
        self.init_headers(headers)

    def _events(self, chunks: list[bytes]) -> bytes:
        """The chunks as SSE events, in one join (the usage-only chunk when it was asked)."""
        if not chunks:
            return b""
        events = b"data: " + b"\n\ndata: ".join(chunks) + b"\n\n"
        if self.include_usage or b'"usage"' not in events:  # one scan a burst, not one a chunk
            return events
        chunks = [c for c in chunks if b'"usage"' not in c or not is_usage_only(c)]
        return b"data: " + b"\n\ndata: ".join(chunks) + b"\n\n" if chunks else b""

    async def _write(self, served: Served, send: Send) -> None:
        """Write the answer as it arrives, a burst in one write; the last burst is held
        back in `held` (it leaves with the end of the stream, after the ledger row), and so
        is what was held when an error ends the stream (it leaves before the error event).

        Before a write the task lets the loop turn once (no timer: an idle loop turns at
        once): frames that arrived in that turn go in the same write. Under 500 streams
        this cut the client writes by 35-40% (14-16.5 -> 8.4-10 a stream,
        scripts/bench/streams.py), each one an ASGI send through the middlewares, a
        socket write and a wake-up of the client. While the coordinator runs behind
        (coordinator/write_tick.py) a stream that wrote less than a tick ago waits for the
        shared tick instead, or for its end, whichever comes first."""
        loop = asyncio.get_running_loop()
        wrote_at = float("-inf")  # the first write is never held
        self.held = self._events([served.first])
        if self.held and not served.queued():  # the first token leaves at once
            await send({"type": "http.response.body", "body": self.held, "more_body": True})
            self.held = b""
            wrote_at = loop.time()
            self._uncork()
        tick = self.tick
        counted = tick.on and served.gathers
        if counted:
            tick.opened(loop)
        waited = False
        try:
            async with contextlib.aclosing(served.batches()) as batches:
                async for batch in batches:
                    self.held += self._events(batch)
                    if not self.held or served.ending:  # the end's burst goes with it
                        continue
                    if not waited:  # what arrives meanwhile goes along
                        waited = True
                        if (counted and tick.paces()
                                and (now := loop.time()) - wrote_at < tick.tick_s):
                            await self._tick(served, loop, now)
                        else:  # one loop turn
                            await asyncio.sleep(0)
                        if served.queued():
                            continue
                    waited = False
                    await send({"type": "http.response.body", "body": self.held,
                                "more_body": True})
                    self.held = b""
                    wrote_at = loop.time()
                    self._uncork()
        finally:
            if counted:
                tick.closed()

    async def _tick(self, served: Served, loop: asyncio.AbstractEventLoop, now: float) -> None:
        """Until the write tick, or the end of the answer if it comes first."""
        self._resume = wake = loop.create_future()
        served.on_end(self.tick_resume)
        self.tick.hold(self, loop, now)
        try:
            await wake
        finally:
            self._resume = None
            served.on_end(None)

    def tick_resume(self) -> None:
        """The tick is due (or the answer's end came): write what was held."""
        wake = self._resume
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _uncork(self) -> None:
        """After the first write (the head went with it): each write leaves as it is made
        (they are one a burst already), not at the end of the loop's turn."""
        if self.cork is not None:
            self.cork.uncork()
            self.cork = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.cork = scope.get(SSE_CORK)
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        watch = self.watch or Watch(receive, scope)
        served = self.served
        end = b""
        try:
            try:
                if not watch.gone:  # else it left before its first byte: nobody to write to
                    watch.armed = True
                    await self._write(served, send)
                    end = SSE_DONE
            except OpenAIError as exc:
                log.warning("request %s ended with an error after it started: %s",
                            served.request.request_id, exc.message)
                end = sse_error(exc)
        except asyncio.CancelledError:
            if not watch.caught():
                raise
            end = b""  # the client left mid-stream: nobody to write to
        finally:
            watch.stop()
            with anyio.CancelScope(shield=True):
                await served.close()
                await self.commit(with_status(served.row(self.key_id, self.route)))
        await send({"type": "http.response.body", "body": self.held + end, "more_body": False})
