"""Credit back to the peer, sans I/O: what `Connection` grants as the application reads.

A mixin of `Connection` (tunnel/connection.py): the application's reads (`consumed`) and
ended streams (`release`) give credit back, stream and connection, once half a window
was read; WINDOW frames carry it (flow-control rules: tunnel/mux.py, tunnel/DESIGN.md).
"""

from __future__ import annotations

from tunnel.constants import INITIAL_STREAM_WINDOW
from tunnel.events import StreamState
from tunnel.frames import Frame, FrameType
from tunnel.session import Session

__all__ = ["Grants"]


class Grants:
    """Credit granted back for `Connection`; it sets these attributes."""

    session: Session
    closed: str | None
    stream_window: int
    connection_window: int
    ungranted: int  # connection credit read but not yet granted back
    recv_limit: int  # DATA bytes the peer may send on the connection, in all

    def _queue(self, frame: Frame) -> None:
        raise NotImplementedError  # `Connection._queue`

    def consumed(self, state: StreamState, n: int) -> None:
        """The application read `n` DATA bytes of this stream: grant credit back once
        half a window was read (stream and connection)."""
        state.buffered -= n
        if state.released:
            return  # its connection credit went back when this side ended the stream
        self._conn_consumed(n)
        if state.closed:
            return  # nothing more will come on it
        state.ungranted += n
        if state.ungranted >= self.stream_window // 2:
            grant, state.ungranted = state.ungranted, 0
            state.recv_limit += grant
            self._grant(state.id, grant)

    def release(self, state: StreamState) -> None:
        """Nobody will read what this stream still buffers: give its connection credit
        back (this side ended it, or its handler returned)."""
        if not state.released:
            state.released = True
            self._conn_consumed(state.buffered)

    def _conn_consumed(self, n: int) -> None:
        self.ungranted += n
        if self.ungranted >= self.connection_window // 2:
            grant, self.ungranted = self.ungranted, 0
            self.recv_limit += grant
            self._grant(0, grant)

    def _grant_initial(self, state: StreamState) -> None:
        if self.stream_window > INITIAL_STREAM_WINDOW:
            state.recv_limit = self.stream_window
            self._grant(state.id, self.stream_window - INITIAL_STREAM_WINDOW)

    def _grant(self, stream_id: int, credit: int) -> None:
        if credit > 0 and self.closed is None and self.session.dead is None:
            self._queue(Frame(FrameType.WINDOW, stream_id, 0, 0, {"credit": credit}))
