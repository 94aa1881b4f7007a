"""Many request streams over one Link.

Stream ids: the node (initiator) opens odd ids, the coordinator even ids;
stream 0 is the control stream. One reader (`Mux.run`) pulls frames off the
link and drops each into its stream's queue, so it never waits on a slow
consumer; control frames go to one queue served by one task, in order.

Flow control (credit, as HTTP/2): DATA body bytes need credit on their stream
and on the connection. Each side starts with `INITIAL_STREAM_WINDOW` per stream
and `INITIAL_CONNECTION_WINDOW` for the connection from the other; a receiver
configured with larger windows grants the difference at once. A sender with no
credit waits (a body up to 16 KiB goes whole; a larger one in pieces as credit
allows). The receiver grants credit back with WINDOW frames as its consumer *reads* (`Stream.recv`),
not as frames arrive, once half a window was read; so a stream's queue never
holds more than its window, and a consumer that stops reading stops its peer
without stalling other streams. A peer that sends past its credit breaks the
protocol: the session ends (1002, FrameError). Below all this, `Link.send`
waits while the transport's buffer is full (`Link.queued_bytes` over WRITE_HIGH_WATER).

GOAWAY (`Mux.goaway`, `Mux.shutdown`): the side going away opens no more
streams and refuses the peer's new ones (ERROR 503); the peer's `open` raises
ClosedError from then on; streams already open run to their end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from tunnel.connection import STREAM_SEND_TYPES, Credit, Event, Opened, Received
from tunnel.constants import INITIAL_CONNECTION_WINDOW, INITIAL_STREAM_WINDOW, MAX_CONTROL_QUEUED
from tunnel.errors import ClosedError, FrameError, TunnelError
from tunnel.frames import TERMINAL, Frame, FrameType
from tunnel.link import Link
from tunnel.stream import Stream, until_cancelled

log = logging.getLogger(__name__)

OnStream = Callable[[Stream, Frame], Awaitable[None]]
OnControl = Callable[[Frame], Awaitable[None]]

__all__ = ["STREAM_SEND_TYPES", "Mux", "OnControl", "OnStream", "Stream", "until_cancelled"]


class Mux:
    """Streams and control frames over one Link: the asyncio side of the core's
    streams (the `Connection` at `link.conn` keeps their credit and state)."""

    def __init__(
        self,
        link: Link,
        *,
        initiator: bool,
        on_stream: OnStream | None = None,
        on_control: OnControl | None = None,
        on_control_now: Callable[[Frame], bool] | None = None,
        stream_window: int = INITIAL_STREAM_WINDOW,
        connection_window: int = INITIAL_CONNECTION_WINDOW,
        raw_bodies: Iterable[FrameType] = (),
    ) -> None:
        link.conn.set_windows(stream_window, connection_window)  # ValueError if too small
        #: control frames of these types come with their body as msgpack bytes, for the
        #: handler to decode typed in one pass (`frames.decode_raw`)
        link.conn.session.raw_bodies = frozenset(int(kind) for kind in raw_bodies)
        link.conn.set_role(initiator)
        self.link = link
        self.conn = link.conn
        self.initiator = initiator
        self.on_stream = on_stream
        self.on_control = on_control
        #: Tried first, in the reader, for a control frame when none is queued or being
        #: handled (order kept): True if it handled the frame without waiting for
        #: anything; False queues it for `on_control` as usual. Saves a task switch a
        #: frame for what a coordinator gets most (1 Hz telemetry from every node).
        self.on_control_now = on_control_now
        self._control_busy = False
        self.stream_window = stream_window
        self.connection_window = connection_window
        self._streams: dict[int, Stream] = {}
        self._credit_waiting: set[Stream] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._control: deque[tuple[Frame, int]] = deque()
        self._control_bytes = 0
        self._control_ready = asyncio.Event()
        self._reading_paused = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def send_credit(self) -> int:
        """Bytes of DATA this side may send on the connection now (all streams together)."""
        return self.conn.send_credit

    @property
    def buffered(self) -> int:
        """DATA bytes queued on open streams, not yet read by their consumers."""
        return sum(stream.buffered for stream in self._streams.values())

    @property
    def _ungranted(self) -> int:
        return self.conn.ungranted

    @property
    def going_away(self) -> str | None:
        """Why this side sent GOAWAY."""
        return self.conn.going_away

    @property
    def peer_going_away(self) -> str | None:
        """Why the peer did."""
        return self.conn.peer_going_away

    async def open(self, body: dict[str, Any]) -> Stream:
        """Send OPEN on a fresh stream id and return the stream.

        ClosedError once either side sent GOAWAY: open it on another connection."""
        stream_id = self.conn.open_stream(body)
        stream = self._streams[stream_id] = Stream(self, self.conn.streams[stream_id])
        self._idle.clear()
        await self.link.sent(now=True)  # a request's way: not held to the turn's end
        return stream

    async def send_control(self, type: FrameType, body: Any) -> None:
        self.conn.send_control(type, body)
        await self.link.sent()

    async def goaway(self, reason: str = "shutting down") -> None:
        """Tell the peer to open no more streams here; streams already open go on."""
        if self.conn.goaway(reason):
            await self.link.sent()

    async def wait_idle(self) -> None:
        """Return once no stream is open."""
        await self._idle.wait()

    async def shutdown(self, reason: str = "shutting down", grace: float = 30.0) -> None:
        """GOAWAY, let the open streams finish (up to `grace` s), then close the link."""
        with contextlib.suppress(TunnelError):
            await self.goaway(reason)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        await self.link.close(reason)

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        if not self._streams:
            self._idle.set()

    async def run(self) -> None:
        """Read until the link closes; then every open stream's recv raises ClosedError.
        Returns when the link closed; raises FrameError when the peer broke the protocol
        or passed a bound (logged once, by the link).

        Reading is push: the link hands each message's events to `_dispatch` in the loop
        callback that read it (no reader task); this coroutine only waits for the end."""
        control = self._spawn(self._control_loop())
        reason = "link closed"
        link = self.link
        try:
            events = list(link._pending)
            link._pending.clear()
            link.kick()  # what the core queued before us (a WINDOW for a larger window)
            self._dispatch(events)
            link._on_events = self._dispatch
            link.hand_control_to(self._on_control_frame)
            await link._until_closed()
        except ClosedError:
            pass
        except FrameError as exc:
            reason = f"link failed: {exc}"
            raise
        finally:
            link._on_events = None
            link.hand_control_to(None)
            if reason == "link closed" and link.closed_reason:
                reason = f"link closed: {link.closed_reason}"
            for stream in list(self._streams.values()):
                stream._kill(reason)
            for stream in list(self._credit_waiting):
                stream._kill(reason)
            self._streams.clear()
            self._idle.set()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await control

    def _dispatch(self, events: list[Event]) -> bool:
        """Hand each event on; True if one became a task's work (a stream the peer
        opened, a control frame queued): the link lets it run before the next message."""
        handed = False
        for event in events:
            if isinstance(event, Received):
                frame = event.frame
                if frame.stream_id == 0:
                    handed = self._on_control_frame(frame, event.size) or handed
                    continue
                stream = self._streams.get(frame.stream_id)
                if stream is None:
                    continue
                if frame.type in TERMINAL:
                    self._forget(frame.stream_id)
                stream._deliver(frame)
            elif isinstance(event, Credit):
                self._on_credit(event.stream_id)
            elif isinstance(event, Opened):
                self._accept_stream(event.frame)
                handed = True
        return handed

    def _on_credit(self, stream_id: int) -> None:
        if stream_id == 0:
            for waiting in list(self._credit_waiting):
                waiting._wake_credit()
        else:
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream._wake_credit()

    def _on_control_frame(self, frame: Frame, size: int) -> bool:
        """Handled now (False), or queued for the control task (True)."""
        now = self.on_control_now
        if now is not None and not self._control and not self._control_busy:
            try:
                if now(frame):
                    return False
            except Exception:
                log.exception("control frame %s handler failed", frame.type.name)
                return False
        self._control.append((frame, size))
        self._control_bytes += size
        self._control_ready.set()
        if self._control_bytes > MAX_CONTROL_QUEUED and not self._reading_paused:
            self._reading_paused = True  # backpressure: the handler is behind
            self.link.pause_reading("control")
        return True

    def _accept_stream(self, frame: Frame) -> None:
        state = self.conn.streams[frame.stream_id]
        if self.on_stream is None:
            log.warning("refusing stream %s opened by the peer", frame.stream_id)
            self.conn.refuse(frame.stream_id, 400, "this side does not accept streams")
            self.link.kick()
            return
        stream = self._streams[frame.stream_id] = Stream(self, state)
        self._idle.clear()
        self._spawn(self._serve(stream, frame))

    async def _serve(self, stream: Stream, frame: Frame) -> None:
        assert self.on_stream is not None
        try:
            await self.on_stream(stream, frame)
        except TunnelError as exc:
            log.info("stream %s ended by the link: %s", stream.id, exc)
        except Exception:
            log.exception("stream %s handler failed", stream.id)
        if not stream.closed:
            with contextlib.suppress(TunnelError):
                body = {"status": 500, "message": "the stream's handler ended without END"}
                await stream.send(FrameType.ERROR, body)
        self.conn.release(stream._state)  # nobody will read what is still queued
        if self.conn.pending_bytes:
            self.link.kick()

    async def _control_loop(self) -> None:
        while True:
            while not self._control:
                self._control_ready.clear()
                await self._control_ready.wait()
            frame, size = self._control.popleft()
            self._control_bytes -= size
            if self._reading_paused and self._control_bytes <= MAX_CONTROL_QUEUED:
                self._reading_paused = False
                self.link.resume_reading("control")
            if self.on_control is None:
                continue
            self._control_busy = True
            try:
                await self.on_control(frame)
            except TunnelError as exc:
                log.info("control frame %s not handled: %s", frame.type.name, exc)
            except Exception:
                log.exception("control frame %s handler failed", frame.type.name)
            finally:
                self._control_busy = False

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
