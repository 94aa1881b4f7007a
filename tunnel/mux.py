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

from tunnel.connection import STREAM_SEND_TYPES, Credit, Event, Opened, Received, StreamState
from tunnel.constants import INITIAL_CONNECTION_WINDOW, INITIAL_STREAM_WINDOW, MAX_CONTROL_QUEUED
from tunnel.errors import ClosedError, FrameError, TunnelError
from tunnel.frames import TERMINAL, Frame, FrameType
from tunnel.link import WRITE_HIGH_WATER, Link

log = logging.getLogger(__name__)

# DATA bodies up to this size wait for credit for all of their bytes and go as one frame;
# larger ones go in pieces as credit allows. Below half the smallest window, so the
# credit a drained receiver leaves (over half a window) always admits one.
WHOLE_DATA = 16 * 1024
OnStream = Callable[["Stream", Frame], Awaitable[None]]
OnControl = Callable[[Frame], Awaitable[None]]

__all__ = ["STREAM_SEND_TYPES", "Mux", "OnControl", "OnStream", "Stream", "until_cancelled"]


class Stream:
    def __init__(self, mux: Mux, state: StreamState) -> None:
        self.id = state.id
        self._mux = mux
        self._state = state
        self._frames: deque[Frame] = deque()
        self._reader: asyncio.Future[None] | None = None
        self._credit: asyncio.Future[None] | None = None
        self._dead: str | None = None
        self._send_lock = asyncio.Lock()
        self._on_cancel: Callable[[], None] | None = None  # set by `until_cancelled`
        self.settle = 0
        """Wake a waiting `recv` this many loop turns after a frame arrives, not at once:
        what those turns bring is read with it (a reader that writes each wake-up's frames
        out in one write needs no turn of its own for that)"""
        self._settling = 0

    @property
    def closed(self) -> bool:
        return self._state.closed or self._dead is not None

    @property
    def send_credit(self) -> int:
        """Bytes of DATA this side may send on this stream now."""
        return self._state.send_credit

    @property
    def buffered(self) -> int:
        """DATA body bytes queued, not yet read by the consumer."""
        return self._state.buffered

    @property
    def peak_buffered(self) -> int:
        """The most DATA bytes that were ever queued at once."""
        return self._state.peak_buffered

    @property
    def queued(self) -> int:
        """Frames that arrived and wait to be read (`recv_nowait` returns them at once)."""
        return len(self._frames)

    async def send(self, type: FrameType, body: Any) -> None:
        """Send DATA, END, ERROR, CANCEL or WINDOW on this stream.

        DATA waits for credit (stream and connection) and goes in pieces if credit is
        short; WINDOW grants the peer extra credit on top of what reading grants."""
        if type not in STREAM_SEND_TYPES:
            raise TunnelError(f"{type.name} cannot be sent on a stream")
        if self._dead is not None:
            raise ClosedError(f"stream {self.id}: {self._dead}")
        if type == FrameType.DATA and isinstance(body, bytes) and body:
            mux = self._mux
            conn, state, n = mux.conn, self._state, len(body)
            if (  # the hot path, `_send_data`'s, inline: two coroutines less a token frame
                n <= WHOLE_DATA
                and not self._send_lock.locked()
                and n <= state.send_credit
                and n <= conn.send_credit
            ):
                conn.send_data(state, body)
                link = mux.link
                link.kick()
                if link.queued_bytes > WRITE_HIGH_WATER:
                    await link.sent()
                return
            await self._send_data(body)
            return
        mux = self._mux
        mux.conn.send(self._state, type, body)
        if type in TERMINAL:
            mux._forget(self.id)
            self._wake_credit()
        await mux.link.sent()

    async def _send_data(self, body: bytes) -> None:
        mux = self._mux
        conn = mux.conn
        state = self._state
        n = len(body)
        if (  # the hot path: credit at hand and no other sender of this stream waiting
            n <= WHOLE_DATA
            and not self._send_lock.locked()
            and n <= state.send_credit
            and n <= conn.send_credit
        ):
            conn.send_data(state, body)
            await mux.link.sent()
            return
        async with self._send_lock:
            n = len(body)
            if n <= WHOLE_DATA:  # the common case, a token event: one frame, no copy
                if conn.sendable(self._state) < n:
                    await self._wait_credit(n)
                conn.send_data(self._state, body)
                await mux.link.sent()
                return
            view = memoryview(body)
            while view:
                # a small body (a token event) goes whole, never split by a credit edge
                await self._wait_credit(len(view) if len(view) <= WHOLE_DATA else 1)
                n = min(len(view), conn.sendable(self._state))
                piece, view = bytes(view[:n]), view[n:]
                conn.send_data(self._state, piece)
                await mux.link.sent()

    async def _wait_credit(self, need: int) -> None:
        """Until stream and connection have `need` bytes of credit; ClosedError as soon
        as the stream or the link ends."""
        state, conn = self._state, self._mux.conn
        while True:
            if self._dead is not None:
                raise ClosedError(f"stream {self.id}: {self._dead}")
            if state.sent_end:
                raise ClosedError(f"stream {self.id} ended")
            if state.peer_ended:
                raise ClosedError(f"stream {self.id} ended by the peer")
            if conn.closed is not None:
                raise ClosedError(f"link is closed: {conn.closed}")
            if conn.sendable(state) >= need:
                return
            self._credit = asyncio.get_running_loop().create_future()
            self._mux._credit_waiting.add(self)
            try:
                await self._credit
            finally:
                self._credit = None
                self._mux._credit_waiting.discard(self)

    def _wake_credit(self) -> None:
        if self._credit is not None and not self._credit.done():
            self._credit.set_result(None)

    async def recv(self) -> Frame:
        """The peer's next frame on this stream; ClosedError once it ended or the link died."""
        while not self._frames:
            if self._dead is not None or self._state.peer_ended:
                raise ClosedError(f"stream {self.id}: {self._dead or 'ended'}")
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        return self._take()

    def recv_nowait(self) -> Frame | None:
        """The peer's next frame if one has arrived, else None (never waits; `recv` says
        when the stream is over): a reader drains what a burst delivered in one go."""
        return self._take() if self._frames else None

    def _take(self) -> Frame:
        frame = self._frames.popleft()
        if frame.type == FrameType.DATA:
            mux = self._mux
            mux.conn.consumed(self._state, len(frame.body))
            if mux.conn.pending_bytes:
                mux.link.kick()  # a WINDOW
        return frame

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Frame:
        """Frames up to and including the peer's END, ERROR or CANCEL."""
        if self._state.peer_ended and not self._frames:
            raise StopAsyncIteration
        try:
            return await self.recv()
        except ClosedError:
            if self._dead is None:
                raise StopAsyncIteration from None
            raise

    # -- called by the mux's reader --------------------------------------------------

    def _deliver(self, frame: Frame) -> None:
        if self._on_cancel is not None:  # an answer runs (`until_cancelled`): nobody reads
            if frame.type in TERMINAL:
                self._wake_credit()
            if frame.type == FrameType.CANCEL:
                self._on_cancel()
            elif frame.type == FrameType.DATA:  # dropped, its credit granted back
                self._drop(frame)
            return
        self._frames.append(frame)
        if frame.type in TERMINAL:
            self._wake_credit()
        if self._reader is not None and not self._reader.done():
            if not self.settle:
                self._reader.set_result(None)
            elif not self._settling:
                self._settling = self.settle
                asyncio.get_running_loop().call_soon(self._settled)

    def _settled(self) -> None:
        self._settling -= 1
        if self._settling > 0:
            asyncio.get_running_loop().call_soon(self._settled)
        elif self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def _drop(self, frame: Frame) -> None:
        mux = self._mux
        mux.conn.consumed(self._state, len(frame.body))
        if mux.conn.pending_bytes:
            mux.link.kick()

    def _kill(self, reason: str) -> None:
        """The link died under an unfinished stream: it fails at once, queued frames
        included (it can never be complete; one that got its END stays readable)."""
        if self._dead is None and not self._state.peer_ended:
            self._dead = reason
            self._frames.clear()
            self._state.buffered = 0
        self._wake_credit()
        if self._on_cancel is not None:
            self._on_cancel()
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)


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
        await self.link.sent()
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
            await link._until_closed()
        except ClosedError:
            pass
        except FrameError as exc:
            reason = f"link failed: {exc}"
            raise
        finally:
            link._on_events = None
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
        if (self.on_control_now is not None and not self._control
                and not self._control_busy and self._handled_now(frame)):
            return False
        self._control.append((frame, size))
        self._control_bytes += size
        self._control_ready.set()
        if self._control_bytes > MAX_CONTROL_QUEUED and not self._reading_paused:
            self._reading_paused = True  # backpressure: the handler is behind
            self.link.pause_reading("control")
        return True

    def _handled_now(self, frame: Frame) -> bool:
        assert self.on_control_now is not None
        try:
            return self.on_control_now(frame)
        except Exception:
            log.exception("control frame %s handler failed", frame.type.name)
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


async def until_cancelled(stream: Stream, work: Coroutine[Any, Any, None]) -> bool:
    """Run `work` (the answer to a stream the peer opened) until it ends, or until the
    peer sends CANCEL on `stream` or the link dies, which cancels it. True if cancelled.

    `work` runs in the caller's task: the stream's delivery calls back on CANCEL or a
    dead link and cancels that task (no second task, no watcher per request). Frames the
    peer sends meanwhile are dropped (nothing reads a stream while its answer runs), DATA
    with its credit granted back. A TunnelError out of `work` ends it quietly."""
    task = asyncio.current_task()
    assert task is not None
    while (early := stream.recv_nowait() if stream._dead is None else None) is not None:
        if early.type == FrameType.CANCEL:  # cancelled before the answer began
            work.close()
            return True
    if stream._dead is not None:
        work.close()
        return True
    fired = False

    def cancel() -> None:
        nonlocal fired
        if not fired:
            fired = True
            task.cancel()

    stream._on_cancel = cancel
    taken_back = False
    try:
        await work
    except asyncio.CancelledError:
        taken_back = fired
        if not fired or task.uncancel() > 0:  # someone else cancelled us too: theirs
            raise
    except TunnelError:
        pass
    finally:
        stream._on_cancel = None
        if fired and not taken_back:  # the work caught our cancel itself
            task.uncancel()
    return fired
