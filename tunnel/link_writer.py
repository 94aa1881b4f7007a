"""The writing half of a `Link` (a mixin): write rounds, backpressure, flush.

`kick` schedules one write round per loop iteration (`call_soon`, no task), which
encrypts everything the core queued since the last round into as few messages as it can;
while the transport's buffer is over its high-water mark no round writes, frames wait in
the core, and senders wait (`sent`) while more than WRITE_HIGH_WATER bytes wait there.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from tunnel.connection import Connection
from tunnel.errors import ClosedError, FrameError
from tunnel.frames import Frame
from tunnel.wire import WireClosed, WsConnection

# Frames queued in the core past this many bytes make senders wait for the writer.
WRITE_HIGH_WATER = 256 * 1024

__all__ = ["WRITE_HIGH_WATER", "Writer"]


class Writer:
    """`Link`'s sending side; the Link's constructor sets these attributes."""

    conn: Connection
    _ws: WsConnection
    _loop: asyncio.AbstractEventLoop
    _room: asyncio.Event
    _kicks: int  # rounds asked of the writer
    _written: int  # rounds it finished
    _write_soon: bool
    _unsent: deque[bytes]  # encrypted, held while the transport is full
    _unsent_bytes: int
    _flushes: list[asyncio.Future[None]]

    def _mark_closed(self, reason: str) -> None:
        raise NotImplementedError  # `Link._mark_closed`

    async def send(self, frame: Frame) -> None:
        """Queue one frame (its seq is assigned by the session) and let the writer send
        it; waits while too much is queued (the socket is slow or stalled)."""
        self.conn.send_raw(frame)
        await self.sent()

    async def sent(self, *, now: bool = False) -> None:
        """Schedule a write round for what the core has queued; wait while over the
        high-water mark (backpressure: a full transport stops the writer, which stops us).

        `now`: when no round is due yet (nothing else was queued in this loop turn), what
        is queued leaves at once rather than at the turn's end (a request's OPEN: the rest
        of the turn is then not on its way). The round is scheduled all the same, so what
        is queued later in this turn still leaves together in it."""
        due = self._write_soon
        self.kick()
        if now and not due:
            self._write()
        while self.conn.pending_bytes + self._unsent_bytes > WRITE_HIGH_WATER:
            if self.conn.closed is not None:
                raise ClosedError(f"link is closed: {self.conn.closed}")
            self._room.clear()
            await self._room.wait()

    def kick(self) -> None:
        """The core has something to send: it leaves in this loop iteration's write round
        (frames queued meanwhile go along; an idle link adds no delay)."""
        if self.conn.closed is not None:
            return
        self._kicks += 1
        if not self._write_soon:
            self._write_soon = True
            self._loop.call_soon(self._write_round)

    def _write_round(self) -> None:
        self._write_soon = False
        self._write()

    def _write(self) -> None:
        ws = self._ws
        if self.conn.closed is not None or ws.full():
            return  # `_on_writable` starts a round when the transport drained
        target = self._kicks
        try:
            unsent = self._unsent
            while unsent:  # what a full transport left over, first (nonce order)
                message = unsent.popleft()
                self._unsent_bytes -= len(message)
                ws.send_message(message)
                if ws.full():
                    self._room.set()
                    return
            for message in self.conn.data_to_send(time.monotonic()):
                if ws.full():  # hold the rest, encrypted, in order
                    unsent.append(message)
                    self._unsent_bytes += len(message)
                else:
                    ws.send_message(message)
        except WireClosed as exc:
            self._mark_closed(f"connection closed ({exc})")
            return
        except FrameError as exc:  # the session died under us
            self._mark_closed(str(exc))
            return
        self._room.set()  # senders look again: less is held now
        if self._unsent:
            return
        self._written = target
        self._wake_flushes()

    def _on_writable(self) -> None:
        if self.conn.pending_bytes or self._unsent or self._written < self._kicks:
            self._kicks += 1
            if not self._write_soon:
                self._write_soon = True
                self._loop.call_soon(self._write_round)

    def _wake_flushes(self) -> None:
        waiting, self._flushes = self._flushes, []
        for flush in waiting:
            if not flush.done():
                flush.set_result(None)

    async def flush(self) -> None:
        """Return once every frame queued so far was written (or the link closed)."""
        target = self._kicks
        while self._written < target and self.conn.closed is None:
            flush = self._loop.create_future()
            self._flushes.append(flush)
            await flush
