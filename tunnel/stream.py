"""One request stream of a `Mux`: its frames queue, its credit waits, its end.

`Stream.recv` reads what the mux's reader delivered (`_deliver`); `Stream.send` sends
DATA within credit (stream and connection, kept by the core's `StreamState`) and END,
ERROR, CANCEL, WINDOW. `until_cancelled` runs the answer to a stream the peer opened
until it ends or the peer cancels it. Flow-control rules: tunnel/mux.py, tunnel/DESIGN.md.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from tunnel.connection import STREAM_SEND_TYPES, StreamState
from tunnel.errors import ClosedError, TunnelError
from tunnel.frames import TERMINAL, Frame, FrameType
from tunnel.link import WRITE_HIGH_WATER

if TYPE_CHECKING:
    from tunnel.mux import Mux

# DATA bodies up to this size wait for credit for all of their bytes and go as one frame;
# larger ones go in pieces as credit allows. Below half the smallest window, so the
# credit a drained receiver leaves (over half a window) always admits one.
WHOLE_DATA = 16 * 1024

__all__ = ["WHOLE_DATA", "Stream", "until_cancelled"]


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
        self._on_end: Callable[[], None] | None = None  # set by `on_end`

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

    async def send_last(self, data: bytes, end: dict[str, Any]) -> None:
        """Send `data` and then END (body `end`): one frame when the peer reads that (its
        OPEN said so: tunnel/fused.py) and the credit for all of it is at hand, else
        DATA (as `send`, waiting for credit) and then END."""
        if self._dead is not None:
            raise ClosedError(f"stream {self.id}: {self._dead}")
        mux = self._mux
        if not self._send_lock.locked() and mux.conn.send_last(self._state, data, end):
            mux._forget(self.id)
            self._wake_credit()
            # an answer's way ends here: it leaves at once, not at the loop turn's end (what
            # the handler does after it, its task's end and the metering, is not on its way)
            await mux.link.sent(now=True)
            return
        await self.send(FrameType.DATA, data)
        await self.send(FrameType.END, end)

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

    def on_end(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` when the peer's END, ERROR or CANCEL arrives, or the link dies
        (a reader that waits for something else meanwhile, a tick, hears of the end at
        once); None: no longer."""
        self._on_end = callback

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
            if self._on_end is not None:
                self._on_end()
        if self._reader is not None and not self._reader.done():
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
        if self._on_end is not None:
            self._on_end()
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)


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
