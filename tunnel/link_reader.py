"""The pulling side of a `Link` (a mixin): without a Mux, events wait in a small queue
that `recv` (or `async for frame in link`) reads; past MAX_PENDING_EVENTS the link stops
reading the socket until the reader catches up. Data read here gives its credit back at
once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from tunnel.connection import Connection
from tunnel.errors import ClosedError
from tunnel.events import Event, Opened, Received
from tunnel.frames import Frame, FrameType
from tunnel.wire import WsConnection

# Events queued for `recv` (no Mux reading) past this many: stop reading the socket.
MAX_PENDING_EVENTS = 256

__all__ = ["MAX_PENDING_EVENTS", "Reader"]


class Reader:
    """`Link`'s queue for `recv`; the Link's constructor sets these attributes."""

    conn: Connection
    _ws: WsConnection
    _loop: asyncio.AbstractEventLoop
    _recv_lock: asyncio.Lock
    _pending: deque[Event]
    _arrived: asyncio.Future[None] | None  # a `recv` waits for events
    _paused: bool  # reading stopped: `_pending` is full

    def kick(self) -> None:
        raise NotImplementedError  # `Writer.kick` (before this class in `Link`'s bases)

    def _raise_if_closed(self) -> None:
        raise NotImplementedError  # `Link._raise_if_closed`

    def _queue_for_recv(self, events: list[Event]) -> bool:
        self._pending.extend(events)
        if len(self._pending) > MAX_PENDING_EVENTS and not self._paused:
            self._paused = True
            self._ws.pause_reading("recv")
        self._wake_reader()
        return True

    def _wake_reader(self) -> None:
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)

    async def recv(self) -> Frame:
        """The next frame for the caller; ClosedError when the link is closed. (Without
        a Mux: DATA read here gives its credit back at once.)"""
        async with self._recv_lock:
            while True:
                while self._pending:
                    event = self._pending.popleft()
                    if self._paused and len(self._pending) <= MAX_PENDING_EVENTS // 2:
                        self._paused = False
                        self._ws.resume_reading("recv")
                    if isinstance(event, Received | Opened):
                        frame = event.frame
                        if frame.type == FrameType.DATA:
                            state = self.conn.streams.get(frame.stream_id)
                            if state is not None:
                                self.conn.consumed(state, len(frame.body))
                                self.kick()
                        return frame
                self._raise_if_closed()
                self._arrived = self._loop.create_future()
                try:
                    await self._arrived
                finally:
                    self._arrived = None

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[Frame]:
        while True:
            try:
                frame = await self.recv()
            except ClosedError:
                return
            yield frame
