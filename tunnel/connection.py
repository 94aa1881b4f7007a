"""The tunnel connection, sans I/O: streams, credit, GOAWAY, rekey, bounds (the ping
/RTT rules are its `Liveness` part, tunnel/liveness.py; its events, tunnel/events.py).

In the style of python-websockets' `Protocol` and h11: no sockets, no clock, no tasks.
Bytes come in (`receive`, one websocket message at a time, with the time now) and
events come out; what to write comes out of `data_to_send` (with the time now). The
asyncio shell (`ws.Link`, `mux.Mux`) only feeds bytes, writes bytes, waits for credit
and hands events on. Rules: tunnel/DESIGN.md.

Frames queued between two `data_to_send` calls leave together: runs of small frames
share one Noise message (write coalescing); nothing waits for company.

Anything the peer does wrong (bad bytes, seq, credit overrun, a bound passed) raises
FrameError from `receive`; the connection is then dead (`dead` says why), and every
later call raises it again.
"""

from __future__ import annotations

from typing import Any

from tunnel.constants import (
    DATA_CAP_SLACK,
    INITIAL_CONNECTION_WINDOW,
    INITIAL_STREAM_WINDOW,
    MAX_DOWNWARD_STREAMS,
    MAX_OPEN_BYTES,
    MAX_UPWARD_STREAMS,
    MAX_WINDOW,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_S,
)
from tunnel.errors import ClosedError, FrameError, TunnelError
from tunnel.events import Credit, Event, Opened, Pong, Received, StreamState
from tunnel.frames import TERMINAL, Frame, FrameType
from tunnel.fused import FLAG_DATA, FLAG_FUSE, Fused
from tunnel.grants import Grants
from tunnel.liveness import Liveness
from tunnel.session import Prepared, Session

STREAM_SEND_TYPES = frozenset(
    {FrameType.DATA, FrameType.END, FrameType.ERROR, FrameType.CANCEL, FrameType.WINDOW}
)

__all__ = [
    "STREAM_SEND_TYPES",
    "Connection",
    "Credit",
    "Event",
    "Opened",
    "Pong",
    "Received",
    "StreamState",
]


class Connection(Liveness, Grants, Fused):
    def __init__(
        self,
        session: Session,
        *,
        initiator: bool,
        now: float = 0.0,
        stream_window: int = INITIAL_STREAM_WINDOW,
        connection_window: int = INITIAL_CONNECTION_WINDOW,
        max_peer_streams: int | None = None,
        max_open_bytes: int = MAX_OPEN_BYTES,
        ping_interval: float | None = None,
        ping_timeout: float | None = None,
        ping_when_quiet: float | None = None,
        ping_phase: float = 1.0,
        rekey_after_messages: int = REKEY_AFTER_MESSAGES,
        rekey_after_s: float = REKEY_AFTER_S,
    ) -> None:
        self.session = session
        self.initiator = initiator
        self.streams: dict[int, StreamState] = {}
        self._next_id = 1 if initiator else 2
        self.max_peer_streams = max_peer_streams or (
            MAX_DOWNWARD_STREAMS if initiator else MAX_UPWARD_STREAMS
        )
        self.max_open_bytes = max_open_bytes
        self.open_bytes = 0
        self.peer_streams = 0
        # connection credit
        self.send_credit = INITIAL_CONNECTION_WINDOW
        self.recv_total = 0
        self.recv_limit = INITIAL_CONNECTION_WINDOW
        self.ungranted = 0
        self.stream_window = INITIAL_STREAM_WINDOW
        self.connection_window = INITIAL_CONNECTION_WINDOW
        self.set_windows(stream_window, connection_window)
        # GOAWAY
        self.going_away: str | None = None
        self.peer_going_away: str | None = None
        self.last_peer_stream = 0
        self._init_liveness(now, ping_interval, ping_timeout, ping_when_quiet, ping_phase)
        self.rekey_after_messages = rekey_after_messages
        self.rekey_after_s = rekey_after_s
        self._rekeyed_at = now
        # outgoing frames, prepared, not yet encrypted
        self._out: list[Prepared] = []
        self.pending_bytes = 0
        self.closed: str | None = None  # set by the shell when the transport is gone

    # -- configuration ---------------------------------------------------------------

    def set_windows(self, stream_window: int, connection_window: int) -> None:
        """Windows this side grants the peer (>= the protocol's initial ones); the extra
        connection credit is granted at once, the extra stream credit on each OPEN."""
        if not INITIAL_STREAM_WINDOW <= stream_window <= MAX_WINDOW:
            raise ValueError(f"stream_window must be in {INITIAL_STREAM_WINDOW}..{MAX_WINDOW}")
        if not INITIAL_CONNECTION_WINDOW <= connection_window <= MAX_WINDOW:
            raise ValueError(
                f"connection_window must be in {INITIAL_CONNECTION_WINDOW}..{MAX_WINDOW}"
            )
        self.stream_window = stream_window
        self.session.caps[FrameType.DATA] = stream_window + DATA_CAP_SLACK
        extra = connection_window - self.connection_window
        self.connection_window = connection_window
        if extra > 0:
            self.recv_limit += extra
            self._queue(Frame(FrameType.WINDOW, 0, 0, 0, {"credit": extra}))

    @property
    def dead(self) -> str | None:
        return self.session.dead

    # -- sending ---------------------------------------------------------------------

    def _check(self) -> None:
        if self.closed is not None:
            raise ClosedError(f"link is closed: {self.closed}")
        if self.session.dead is not None:
            raise FrameError(f"session is over: {self.session.dead}")

    def _queue(self, frame: Frame) -> None:
        prepared = self.session.prepare(frame)
        self._out.append(prepared)
        self.pending_bytes += len(prepared[0])

    def _queue_stream(self, kind: FrameType, stream_id: int, flags: int, body: Any) -> None:
        """`_queue` for a request stream's OPEN and its end (`Session.prepare_stream`)."""
        prepared = self.session.prepare_stream(kind, stream_id, flags, body)
        self._out.append(prepared)
        self.pending_bytes += len(prepared[0])

    def send_raw(self, frame: Frame) -> None:
        """Queue any frame, as the session's sequence rules allow, without credit or
        stream bookkeeping (link-level use; tests build misbehaving peers with it)."""
        self._check()
        self._queue(frame)

    def open_stream(self, body: dict[str, Any]) -> int:
        """Queue OPEN on a fresh stream id; ClosedError once either side sent GOAWAY. (Its
        FLAG_FUSE tells the peer this side reads a fused answer: `Fused.send_last`.)"""
        self._check()
        if self.peer_going_away is not None:
            raise ClosedError(f"the peer is going away: {self.peer_going_away}")
        if self.going_away is not None:
            raise ClosedError(f"this side is going away: {self.going_away}")
        stream_id = self._next_id
        self._queue_stream(FrameType.OPEN, stream_id, FLAG_FUSE, body)
        self._next_id += 2
        self.streams[stream_id] = state = StreamState(stream_id, INITIAL_STREAM_WINDOW)
        self._grant_initial(state)
        return stream_id

    def sendable(self, state: StreamState) -> int:
        """DATA bytes this side may send on this stream now."""
        return min(state.send_credit, self.send_credit)

    def send_data(self, state: StreamState, body: bytes) -> None:
        """Queue DATA within credit (check `sendable` first): the hot path."""
        if self.closed is not None or state.sent_end or state.peer_ended:
            self._check()
            raise ClosedError(f"stream {state.id} ended")
        n = len(body)
        if n > state.send_credit or n > self.send_credit:
            raise TunnelError(f"stream {state.id}: {n} bytes of DATA past the credit")
        prepared = self.session.prepare_data(state.id, body)
        self._out.append(prepared)
        self.pending_bytes += len(prepared[0])
        state.send_credit -= n
        self.send_credit -= n

    def send(self, state: StreamState, type: FrameType, body: Any) -> None:
        """Queue DATA (within credit: check `sendable`), END, ERROR, CANCEL or WINDOW."""
        self._check()
        if type not in STREAM_SEND_TYPES:
            raise TunnelError(f"{type.name} cannot be sent on a stream")
        if state.closed:
            raise ClosedError(f"stream {state.id} ended")
        if type == FrameType.DATA:
            self.send_data(state, body)
            return
        if type in TERMINAL:
            self._queue_stream(type, state.id, 0, body)
            state.sent_end = True
            self._forget(state)
            self.release(state)
            return
        credit = body.get("credit") if isinstance(body, dict) else None  # WINDOW
        if isinstance(credit, int) and not isinstance(credit, bool) and credit > 0:
            state.recv_limit += credit
        self._queue(Frame(type, state.id, 0, 0, body))

    def send_control(self, type: FrameType, body: Any) -> None:
        self._check()
        self._queue(Frame(type, 0, 0, 0, body))

    def set_role(self, initiator: bool) -> None:
        """Which side this is (the node, which dials, is the initiator: odd stream ids)."""
        if initiator != self.initiator and not self.streams:
            self.initiator = initiator
            self._next_id = 1 if initiator else 2
            self.max_peer_streams = MAX_DOWNWARD_STREAMS if initiator else MAX_UPWARD_STREAMS

    def goaway(self, reason: str) -> bool:
        """Queue GOAWAY once: this side opens no more streams and refuses the peer's."""
        self._check()
        if self.going_away is not None:
            return False
        self.going_away = reason
        body = {"reason": reason, "last_stream": self.last_peer_stream}
        self._queue(Frame(FrameType.GOAWAY, 0, 0, 0, body))
        return True

    def data_to_send(self, now: float) -> list[bytes]:
        """The messages to write now, for every frame queued since the last call (a
        KEY_UPDATE goes last and the send key changes after it when one is due)."""
        if not self._out or self.session.dead is not None:
            return []
        out, self._out, self.pending_bytes = self._out, [], 0
        rekey = (
            self.session.sent_since_rekey + len(out) >= self.rekey_after_messages
            or now - self._rekeyed_at >= self.rekey_after_s
        )
        if rekey:
            out.append(self.session.key_update())
        messages = self.session.encrypt(out)
        if rekey:
            self.session.rekey_send()
            self._rekeyed_at = now
        return messages

    # -- receiving -------------------------------------------------------------------

    def receive(self, message: bytes, now: float) -> list[Event]:
        """Events for one message from the peer; FrameError if the peer broke the
        protocol or a bound (the connection is then dead)."""
        self._check()
        events: list[Event] = []
        try:
            for frame, size in self.session.open_sized(message):
                self._handle(frame, size, now, events)
        except FrameError as exc:
            self.session.dead = self.session.dead or str(exc)
            raise
        self._heard = now
        return events

    def receive_lone(self, message: bytes, now: float) -> tuple[Frame, int] | list[Event]:
        """`receive` with the common case of a coordinator fused (`Session.open_lone`): a
        message that is one control frame whose body the application decodes itself
        (`session.raw_bodies`: telemetry), in order, comes back as (frame, size), the
        `Received` it would have been, with no event objects; anything else as `receive`
        returns it."""
        self._check()
        try:
            got = self.session.open_lone(message)
            if isinstance(got, tuple):
                self._heard = now
                return got
            events: list[Event] = []
            for frame, size in got:
                self._handle(frame, size, now, events)
        except FrameError as exc:
            self.session.dead = self.session.dead or str(exc)
            raise
        self._heard = now
        return events

    def fail(self, reason: str) -> FrameError:
        self.session.dead = self.session.dead or reason
        return FrameError(reason)

    def _handle(self, frame: Frame, size: int, now: float, events: list[Event]) -> None:
        kind = frame.type
        if kind == FrameType.DATA:
            self._on_data(frame, events)
        elif kind == FrameType.WINDOW:
            self._on_window(frame, events)
        elif frame.stream_id == 0:
            if kind == FrameType.PING:
                if self.closed is None:
                    self._queue(Frame(FrameType.PONG, 0, 0, 0, {"t": frame.body["t"]}))
            elif kind == FrameType.PONG:
                sent = self._pings.pop(frame.body["t"], None)
                if sent is not None:
                    self.rtt_ms = (now - sent) * 1000.0
                    self._rtt_at = now
                events.append(Pong(frame.body["t"]))
            elif kind != FrameType.KEY_UPDATE:
                if kind == FrameType.GOAWAY:
                    reason = frame.body.get("reason")
                    self.peer_going_away = reason if isinstance(reason, str) else "going away"
                events.append(Received(frame, size))
        elif kind == FrameType.OPEN:
            self._on_open(frame, size, events)
        else:  # END, ERROR, CANCEL
            self._on_end(frame, events)

    def _on_end(self, frame: Frame, events: list[Event]) -> None:
        if frame.flags & FLAG_DATA and frame.type is FrameType.END:
            frame = self._on_fused(frame, events)  # its DATA first, then the END
        state = self.streams.get(frame.stream_id)
        if state is None:
            return  # crossed our END or CANCEL in flight
        state.peer_ended = True
        self._forget(state)
        events.append(Received(frame))

    def _on_data(self, frame: Frame, events: list[Event]) -> None:
        n = len(frame.body)
        self.recv_total += n
        if self.recv_total > self.recv_limit:
            over = self.recv_total - self.recv_limit
            raise self.fail(f"the peer sent {over} bytes of DATA past the connection's credit")
        state = self.streams.get(frame.stream_id)
        if state is None:  # crossed our END or CANCEL in flight; nobody wants it
            self._conn_consumed(n)
            return
        state.recv_total += n
        if state.recv_total > state.recv_limit:
            over = state.recv_total - state.recv_limit
            raise self.fail(
                f"stream {state.id}: the peer sent {over} bytes of DATA past its credit"
            )
        state.buffered += n
        state.peak_buffered = max(state.peak_buffered, state.buffered)
        events.append(Received(frame))

    def _on_window(self, frame: Frame, events: list[Event]) -> None:
        credit: int = frame.body["credit"]
        if frame.stream_id == 0:
            if self.send_credit + credit > MAX_WINDOW:
                raise self.fail(f"WINDOW on stream 0 grows the credit past {MAX_WINDOW}")
            self.send_credit += credit
        else:
            state = self.streams.get(frame.stream_id)
            if state is None:
                return  # the stream ended meanwhile
            if state.send_credit + credit > MAX_WINDOW:
                raise self.fail(f"WINDOW on stream {state.id} grows the credit past {MAX_WINDOW}")
            state.send_credit += credit
        events.append(Credit(frame.stream_id))

    def _on_open(self, frame: Frame, size: int, events: list[Event]) -> None:
        sid = frame.stream_id
        if sid % 2 != (0 if self.initiator else 1):
            self._refuse(sid, 400, "streams with this parity are not the peer's to open")
            return
        if self.going_away is not None:
            self._refuse(sid, 503, f"going away: {self.going_away}")
            return
        if self.peer_streams >= self.max_peer_streams:
            raise self.fail(f"the peer holds more than {self.max_peer_streams} streams open")
        if self.open_bytes + size > self.max_open_bytes:
            raise self.fail(
                f"the peer's open streams hold more than {self.max_open_bytes} bytes of OPEN"
            )
        self.last_peer_stream = max(self.last_peer_stream, sid)
        self.streams[sid] = state = StreamState(sid, INITIAL_STREAM_WINDOW, size)
        state.peer_fuses = bool(frame.flags & FLAG_FUSE)
        self.peer_streams += 1
        self.open_bytes += size
        self._grant_initial(state)
        events.append(Opened(frame))

    def refuse(self, stream_id: int, status: int, message: str) -> None:
        """Answer the peer's OPEN with ERROR (this side will not serve it)."""
        state = self.streams.get(stream_id)
        if state is not None:
            self.send(state, FrameType.ERROR, {"status": status, "message": message})

    def _refuse(self, stream_id: int, status: int, message: str) -> None:
        if self.closed is None:
            self._queue(
                Frame(FrameType.ERROR, stream_id, 0, 0, {"status": status, "message": message})
            )

    def _forget(self, state: StreamState) -> None:
        peer_parity = 0 if self.initiator else 1
        if self.streams.pop(state.id, None) is not None and state.id % 2 == peer_parity:
            self.peer_streams -= 1
            self.open_bytes -= state.open_bytes
