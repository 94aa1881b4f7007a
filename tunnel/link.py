"""`Link`: the sans-I/O tunnel `Connection` on one websocket (`wire.WsConnection`).

Push, not pull: each message the websocket reads goes through the core in the same loop
callback (`Connection.receive`), and its events go straight to whoever listens (a `Mux`)
or, without one, to a small queue that `recv` reads (the `Reader` part,
tunnel/link_reader.py). Writing is the `Writer` part
(tunnel/link_writer.py): one write round per loop iteration, senders held back while
too much waits. Pings (rules: `Connection.tick`): one timer handle per link
(`call_later`), re-armed at the core's next deadline, or a place on a `TimerWheel` shared
by a server's links (tunnel/timers.py: up to its grain later); the periodic pings' phase
is drawn here, per link.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn

from tunnel.connection import Connection as TunnelConnection
from tunnel.connection import Event, Pong
from tunnel.errors import ClosedError, FrameError
from tunnel.frames import Frame
from tunnel.handshake import Hello
from tunnel.link_reader import Reader
from tunnel.link_writer import WRITE_HIGH_WATER, Writer
from tunnel.session import Session
from tunnel.timers import TimerWheel
from tunnel.wire import Message, WsConnection

log = logging.getLogger("tunnel.ws")

CLOSE_FLUSH_S = 5.0  # how long close() waits to send what is queued
CLOSE_PROTOCOL_ERROR = 1002


class Link(Writer, Reader):
    """One established, authenticated tunnel connection; either side.

    A thin shell on the sans-I/O `Connection` (`link.conn`). PING is answered, PONG
    measured and KEY_UPDATE applied in the core; none of them is returned by `recv`.
    `send` is safe from many tasks.
    """

    def __init__(
        self,
        ws: WsConnection,
        session: Session,
        *,
        initiator: bool = False,
        hello: Hello | None = None,
        accept: dict[str, Any] | None = None,
        ping_interval: float | None = None,
        ping_timeout: float | None = None,
        ping_when_quiet: float | None = None,
        timers: TimerWheel | None = None,
    ) -> None:
        self._ws = ws
        self._session = session
        self._loop = asyncio.get_running_loop()
        self.conn = TunnelConnection(
            session,
            initiator=initiator,
            now=time.monotonic(),
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            ping_when_quiet=ping_when_quiet,
            ping_phase=1.0 - random.random(),  # noqa: S311  (0, 1]: spread a fleet's pings
        )
        self.hello = hello
        self.accept = accept
        self._pongs: dict[int, asyncio.Future[None]] = {}
        self._recv_lock = asyncio.Lock()
        self._pending: deque[Event] = deque()
        self._arrived: asyncio.Future[None] | None = None  # a `recv` waits for events
        self._paused = False  # reading stopped: `_pending` is full
        #: the Mux's dispatch: every event goes there at once, in the reading callback
        #: (True: it handed work to a task, which runs before the next message is read)
        self._on_events: Callable[[list[Event]], bool] | None = None
        #: with `_on_events`, the Mux's handler of one control frame (and its size)
        self._on_control: Callable[[Frame, int], bool] | None = None
        self._first = self._loop.create_future()  # the peer's first message arrived
        self._closed = asyncio.Event()
        self._failure: FrameError | None = None  # the peer broke the protocol: raised once
        self._room = asyncio.Event()
        self._room.set()
        self._kicks = 0  # rounds asked of the writer
        self._written = 0  # rounds it finished
        self._write_soon = False
        self._unsent: deque[bytes] = deque()  # encrypted, held while the transport is full
        self._unsent_bytes = 0
        self._flushes: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        #: the pings' deadlines on a wheel shared with other links (a server's), or None:
        #: a loop timer of this link's own (`_timer`)
        self._timers = timers
        ws.attach(self._on_message, self._on_ws_closed, self._on_writable)

    @property
    def rtt_ms(self) -> float | None:
        return self.conn.rtt_ms

    @property
    def rekey_after_messages(self) -> int:
        return self.conn.rekey_after_messages

    @rekey_after_messages.setter
    def rekey_after_messages(self, value: int) -> None:
        self.conn.rekey_after_messages = value

    @property
    def rekey_after_s(self) -> float:
        return self.conn.rekey_after_s

    @rekey_after_s.setter
    def rekey_after_s(self, value: float) -> None:
        self.conn.rekey_after_s = value

    @property
    def remote_address(self) -> Any:
        return self._ws.remote_address

    @property
    def queued_bytes(self) -> int:
        """Bytes this side holds to send: frames in the core and messages the full
        transport could not take yet (senders wait while over WRITE_HIGH_WATER)."""
        return self.conn.pending_bytes + self._unsent_bytes

    @property
    def closed(self) -> bool:
        return self.conn.closed is not None

    @property
    def closed_reason(self) -> str | None:
        """Why the link closed (None while it is open)."""
        return self.conn.closed

    def _start(self) -> None:
        if self._timer is None and (self._timers is None or not self._timers.waiting(self)):
            self._arm()

    def _arm(self) -> None:
        deadline = self.conn.next_deadline()
        if deadline is None or self.conn.closed is not None:
            self._timer = None
            if self._timers is not None:
                self._timers.discard(self)
            return
        if self._timers is not None:
            self._timers.set(self, deadline)
            return
        self._timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.conn.closed is not None:
            return
        reason = self.conn.tick(time.monotonic())
        if reason is not None:
            self.abort(reason)
            return
        if self.conn.pending_bytes:
            self.kick()
        self._arm()

    async def ping(self, *, wait: bool = False) -> None:
        """Send an authenticated app-level PING; `rtt_ms` is set when its PONG comes back.
        With `wait`, return only once the PONG arrived."""
        if self.conn.closed is not None:
            raise ClosedError(f"link is closed: {self.conn.closed}")
        stamp = self.conn.ping(time.monotonic())
        pong: asyncio.Future[None] | None = None
        if wait:
            pong = self._pongs[stamp] = self._loop.create_future()
        try:
            await self.sent()
            await self.flush()
            if pong is not None:
                await pong
        finally:
            self._pongs.pop(stamp, None)

    # -- receiving ------------------------------------------------------------

    def _on_message(self, message: Message) -> bool:
        """One websocket message, in the callback that read it: through the core, and its
        events on to the Mux (or to `recv`). True: work was handed to another task, let
        it run before the next message."""
        events = self._receive(message)
        if events is None:
            return False
        return self._hand_on(events)

    def hand_control_to(self, handler: Callable[[Frame, int], bool] | None) -> None:
        """With a Mux reading (`_on_events`): a lone control frame whose body it decodes
        itself (telemetry) goes straight to `handler` (frame, size), read by
        `_on_message_fused` (`Connection.receive_lone`: no event objects, no dispatch
        loop); None: every message the usual way."""
        self._on_control = handler
        self._ws._on_message = self._on_message if handler is None else self._on_message_fused

    def _on_message_fused(self, message: Message) -> bool:
        """`_on_message` with the fused case (`hand_control_to`)."""
        conn = self.conn
        on_control = self._on_control
        if on_control is None or type(message) is not bytes or conn.closed is not None:
            return self._on_message(message)
        try:
            got = conn.receive_lone(message, time.monotonic())
        except FrameError as exc:
            self._fail_now(CLOSE_PROTOCOL_ERROR, str(exc))
            return False
        if not isinstance(got, tuple):
            return self._hand_on(got)
        if not self._first.done():
            self._first.set_result(None)
        if conn.pending_bytes:
            self.kick()
        try:
            return on_control(got[0], got[1])
        except Exception:  # a bug above the core: this link cannot go on
            log.exception("tunnel link: handing on a control frame failed")
            self.abort("internal error handing on events")
        return False

    def _hand_on(self, events: list[Event]) -> bool:
        if not self._first.done():
            self._first.set_result(None)
        if self.conn.pending_bytes:
            self.kick()  # PONG, WINDOW, a refusal
        if not events:
            return False
        if self._pongs:
            self._pongs_arrived(events)
        if self._on_events is None:
            return self._queue_for_recv(events)
        try:
            return self._on_events(events)
        except Exception:  # a bug above the core: this link cannot go on
            log.exception("tunnel link: handing on events failed")
            self.abort("internal error handing on events")
        return False

    def _receive(self, message: Message) -> list[Event] | None:
        """The core's events for one message; None if the link is (now) closed."""
        if self.conn.closed is not None:
            return None
        if isinstance(message, str):
            self._fail_now(CLOSE_PROTOCOL_ERROR, "text message on a binary tunnel")
            return None
        try:
            return self.conn.receive(message, time.monotonic())
        except FrameError as exc:
            self._fail_now(CLOSE_PROTOCOL_ERROR, str(exc))
            return None

    def _pongs_arrived(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Pong):
                pong = self._pongs.pop(event.stamp, None)
                if pong is not None and not pong.done():
                    pong.set_result(None)

    def pause_reading(self, why: str) -> None:
        """Stop reading the socket (the consumer `why` is behind); `resume_reading(why)`."""
        self._ws.pause_reading(why)

    def resume_reading(self, why: str) -> None:
        self._ws.resume_reading(why)

    def _raise_if_closed(self) -> None:
        if self.conn.closed is None:
            return
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
        raise ClosedError(f"link is closed: {self.conn.closed}")

    async def _until_closed(self) -> NoReturn:
        """For the Mux: wait until the link closes; FrameError if the peer broke the
        protocol (once), else ClosedError."""
        await self._closed.wait()
        self._raise_if_closed()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _first_frame(self) -> None:
        """Wait for the peer's first encrypted message (key confirmation), keeping what it
        carries for the caller; TunnelError if the link closed first."""
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait([self._first, closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if not self._first.done():
            self._raise_if_closed()

    # -- closing --------------------------------------------------------------

    def _fail_now(self, code: int, reason: str) -> None:
        log.warning("tunnel link closed: %s", reason)
        self.conn.session.dead = self.conn.session.dead or reason
        if self.conn.closed is None:
            self._failure = FrameError(reason)
        self._mark_closed(reason)
        self._ws.start_close(code, reason[:120])

    def _on_ws_closed(self, why: str) -> None:
        self._mark_closed(f"connection closed ({why})")

    def _mark_closed(self, reason: str) -> None:
        if self.conn.closed is None:
            self.conn.closed = reason or "closed"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._timers is not None:
            self._timers.discard(self)
        for pong in self._pongs.values():
            if not pong.done():
                pong.set_exception(ClosedError(f"link is closed: {self.conn.closed}"))
        self._pongs.clear()
        self._room.set()
        self._wake_flushes()
        self._wake_reader()
        self._closed.set()

    def abort(self, reason: str) -> None:
        """Drop the connection at once, without a closing handshake (the path is dead or
        stalled, so none could complete): a reader's `recv` raises ClosedError(reason)."""
        self._mark_closed(reason)
        self._ws.abort()

    async def fail(self, reason: str) -> NoReturn:
        """The peer broke the protocol above the session: close with 1002 and raise
        FrameError(reason)."""
        self._fail_now(CLOSE_PROTOCOL_ERROR, reason)
        self._failure = None  # raised here, to the caller, not again to a reader
        raise FrameError(reason)

    async def close(self, reason: str = "") -> None:
        """Send what is queued (a few seconds at most), then close the websocket."""
        if self.conn.closed is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), CLOSE_FLUSH_S)
        self._mark_closed(reason or "closed by this side")
        await self._ws.close(1000, reason[:120])

    async def wait_closed(self) -> None:
        await self._ws.wait_closed()
        self._mark_closed("connection closed")


__all__ = ["CLOSE_PROTOCOL_ERROR", "WRITE_HIGH_WATER", "Link"]
