"""One websocket on an `asyncio.Protocol`: websockets' sans-I/O protocol, no tasks.

`data_received` feeds websockets' parser (`ServerProtocol` / `ClientProtocol`) and hands
each whole message to `on_message` at once, in the loop callback that read it: no reader
task, no message queue, no future per message. When `on_message` says it handed work to
another task (it returns True: a stream was opened, a control frame queued), the rest of
what was read waits one loop iteration, reading paused, so that work runs before the
next message is decoded (a burst of heavy messages is never decoded all at once).

Writing is `send_message` (into the transport's buffer); `full()` says the buffer is over
its high-water mark and `on_writable` runs when it drained (the caller holds its frames
meanwhile). websockets answers the peer's pings, checks every frame, the size limit
(`max_size`: a larger message is refused with 1009) and the closing handshake; a message
split in fragments is reassembled here within the same limit.

Once OPEN, the common frame (one whole binary message) is read and written by
`wsframes.py` without websockets' parser; anything else (control frames, fragments, text,
a frame to refuse) is handed to websockets from that frame's first byte, so its checks,
answers and close codes are unchanged (see `wsframes.py`).

Used by `ws.py` (the handshake in the HTTP upgrade) and `link.py` (the tunnel on top).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Event, Side, State
from websockets.server import ServerProtocol

from tunnel.wsframes import HAND_OFF, at_frame_start, binary_frame, read_binary

CLOSE_TIMEOUT_S = 10.0  # how long a closing handshake may take before the TCP is dropped
WRITE_LIMIT = 32 * 1024  # the transport's high-water mark (websockets' default write_limit)
Message = bytes | str


class WireClosed(ConnectionError):
    """The websocket is closed (or closing): nothing can be sent."""


class WsConnection(asyncio.Protocol):
    """The websocket of one tunnel, either side."""

    def __init__(self, protocol: ServerProtocol | ClientProtocol) -> None:
        self.protocol = protocol
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        #: the peer's HTTP request (server) or response (client); an exception if the
        #: connection was lost first
        self.handshake: asyncio.Future[Request | Response] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.paused_writing = False
        self._on_message: Callable[[Message], bool] | None = None
        self._on_close: Callable[[str], None] | None = None
        self._on_writable: Callable[[], None] | None = None
        self._early: list[Message] = []  # arrived before `attach`
        self._parts: list[bytes] = []  # a fragmented message so far
        self._text = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._close_said = False
        self._backlog: list[bytes | Event] = []  # read, waiting for the loop's next iteration
        self._pauses: set[str] = set()  # why reading is paused (by whom)
        # the fast path (`wsframes`): a frame begun in an earlier read, and the bytes it
        # needs before it can be read (0: none held; websockets' reader is then empty)
        self._partial = bytearray()
        self._need = 0
        self._websockets_busy = True  # websockets may hold part of a frame (or the upgrade)
        #: False: websockets reads and writes every frame (the twin check's reference)
        self.fast_frames = True
        self._server = protocol.side is Side.SERVER  # reads masked frames, writes unmasked
        limit = protocol.max_message_size
        if protocol.max_fragment_size is not None:
            limit = min(limit or sys.maxsize, protocol.max_fragment_size)
        self._max_size = sys.maxsize if limit is None else limit

    # -- for the tunnel --------------------------------------------------------------

    def attach(
        self,
        on_message: Callable[[Message], bool],
        on_close: Callable[[str], None],
        on_writable: Callable[[], None],
    ) -> None:
        """Where messages, the close and "writable again" go from now on (what arrived
        before is handed on at once)."""
        self._on_message, self._on_close, self._on_writable = on_message, on_close, on_writable
        early, self._early = self._early, []
        for message in early:
            on_message(message)
        if self.protocol.state is not State.OPEN and self.protocol.state is not State.CONNECTING:
            self._said_closed()

    @property
    def is_open(self) -> bool:
        return self.protocol.state is State.OPEN

    @property
    def remote_address(self) -> Any:
        return self.transport.get_extra_info("peername") if self.transport else None

    @property
    def close_code(self) -> int | None:
        return self.protocol.close_code

    def close_reason_text(self) -> str:
        """The close as websockets words it ("received 1000 (OK) bye; then sent ...")."""
        p = self.protocol
        return str(ConnectionClosed(p.close_rcvd, p.close_sent, p.close_rcvd_then_sent))

    def full(self) -> bool:
        """The transport's buffer is over its high-water mark: hold what is left."""
        return self.paused_writing

    def send_message(self, data: bytes) -> None:
        """Queue one binary message on the transport (WireClosed once closing)."""
        protocol = self.protocol
        if protocol.state is not State.OPEN:
            raise WireClosed(self.close_reason_text())
        transport = self.transport
        if (transport is None or protocol.writes or protocol.expect_continuation_frame
                or protocol.extensions or not self.fast_frames):
            protocol.send_binary(data)
            self.write_pending()
            return
        transport.write(binary_frame(data, not self._server))

    async def send(self, data: Message) -> None:
        """A message of either kind, for tests and tools (the tunnel uses `send_message`)."""
        if isinstance(data, str):
            if self.protocol.state is not State.OPEN:
                raise WireClosed(self.close_reason_text())
            self.protocol.send_text(data.encode())
            self.write_pending()
        else:
            self.send_message(data)

    def pause_reading(self, why: str) -> None:
        """Stop reading for `why` (several reasons may hold at once)."""
        if not self._pauses and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._pauses.add(why)

    def resume_reading(self, why: str) -> None:
        """`why` no longer holds; reading goes on once no reason does."""
        if why not in self._pauses:
            return
        self._pauses.discard(why)
        if not self._pauses and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def start_close(self, code: int, reason: str) -> None:
        """Send the close frame now; the TCP connection ends when the peer answers (or is
        dropped after CLOSE_TIMEOUT_S)."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self.write_pending()
        elif self.protocol.state is State.CONNECTING and self.transport is not None:
            self.transport.close()
        self._arm_close_timer()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The closing handshake, then the TCP close (CLOSE_TIMEOUT_S at most)."""
        self.start_close(code, reason)
        await self.wait_closed()

    async def wait_closed(self) -> None:
        await asyncio.shield(self.lost)

    def abort(self) -> None:
        """Drop the TCP connection now (no closing handshake)."""
        if self.transport is not None:
            self.transport.abort()

    # -- writing ---------------------------------------------------------------------

    def write_pending(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():  # SEND_EOF: half-close, the peer then closes
                transport.write_eof()
            else:
                transport.close()
        if self.protocol.close_expected():
            self._arm_close_timer()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and self.transport is not None and not self.lost.done():
            self._close_timer = asyncio.get_running_loop().call_later(
                CLOSE_TIMEOUT_S, self.abort
            )

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's are not asyncio.Transport subclasses: no isinstance)
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_LIMIT)

    def data_received(self, data: bytes) -> None:
        if self._need:  # the fast path holds a frame begun earlier
            partial = self._partial
            partial += data
            if len(partial) < self._need:
                return
            data, self._partial, self._need = bytes(partial), bytearray(), 0
        if not self._reads_fast():
            self._process_or_queue(self._websockets_reads(data))
            return
        messages, pos, need = read_binary(data, self._server, self._max_size)
        if not need and len(messages) == 1 and not self._backlog and self._on_message:
            # the usual read: one whole message (`_process` for it, with nothing after it
            # to hold back whatever work it handed on)
            self._on_message(messages[0])
            if self.protocol.state is not State.OPEN:
                self._said_closed()
            return
        events: list[bytes | Event] = [*messages]
        if need == HAND_OFF:  # a frame that websockets reads (and checks, answers, refuses)
            events.extend(self._websockets_reads(data[pos:]))
        elif need:
            self._partial, self._need = bytearray(memoryview(data)[pos:]), need
        self._process_or_queue(events)

    def _reads_fast(self) -> bool:
        """The next byte starts a frame the fast path may read: the websocket is open,
        no fragmented message is under way, and websockets holds no frame it began."""
        protocol = self.protocol
        if (protocol.state is not State.OPEN or protocol.current_size is not None
                or not self.fast_frames or protocol.extensions):
            return False
        if self._websockets_busy:
            if not at_frame_start(protocol):
                return False
            self._websockets_busy = False
        return True

    def _websockets_reads(self, data: bytes) -> list[Event]:
        protocol = self.protocol
        self._websockets_busy = True  # it may hold part of a frame now
        protocol.receive_data(data)
        self.write_pending()  # pongs, the close echo, an error's close frame
        return protocol.events_received()

    def _process_or_queue(self, events: Sequence[bytes | Event]) -> None:
        if self._backlog:  # still handing on an earlier read: keep the order
            self._backlog.extend(events)
            return
        self._process(events)

    def _hand_partial_to_websockets(self) -> None:
        """At EOF: the begun frame goes to websockets, which words the end as it would."""
        if self._need:
            partial, self._partial, self._need = bytes(self._partial), bytearray(), 0
            if not self.protocol.reader.eof:
                self.protocol.receive_data(partial)

    def _process(self, events: Sequence[bytes | Event]) -> None:
        index, count = 0, len(events)
        while index < count:
            event = events[index]
            index += 1
            if isinstance(event, bytes):  # a whole binary message from the fast path
                if self._deliver(event) and index < count:
                    self._backlog = list(events[index:])
                    self.pause_reading("backlog")
                    asyncio.get_running_loop().call_soon(self._drain_backlog)
                    return
            elif isinstance(event, Frame):
                if self._frame(event) and index < count:  # let that work run first
                    self._backlog = list(events[index:])
                    self.pause_reading("backlog")
                    asyncio.get_running_loop().call_soon(self._drain_backlog)
                    return
            elif not self.handshake.done():
                self.handshake.set_result(event)
        if self.protocol.state is not State.OPEN and self.protocol.state is not State.CONNECTING:
            self._said_closed()

    def _drain_backlog(self) -> None:
        events, self._backlog = self._backlog, []
        self.resume_reading("backlog")
        self._process(events)

    def _frame(self, frame: Frame) -> bool:
        opcode = frame.opcode
        if opcode is Opcode.BINARY or opcode is Opcode.TEXT:
            if frame.fin:  # the usual case: a whole message in one frame
                data = bytes(frame.data)
                return self._deliver(
                    data.decode("utf-8", "replace") if opcode is Opcode.TEXT else data
                )
            self._text = opcode is Opcode.TEXT
            self._parts = [bytes(frame.data)]
        elif opcode is Opcode.CONT:  # websockets checked the order and the total size
            self._parts.append(bytes(frame.data))
            if frame.fin:
                whole, self._parts = b"".join(self._parts), []
                return self._deliver(whole.decode("utf-8", "replace") if self._text else whole)
        elif opcode is Opcode.CLOSE:
            self._said_closed()
        return False

    def _deliver(self, message: Message) -> bool:
        if self._on_message is None:
            self._early.append(message)
            return False
        return self._on_message(message)

    def _said_closed(self) -> None:
        if not self._close_said and self._on_close is not None:
            self._close_said = True
            self._on_close(self.close_reason_text())

    def eof_received(self) -> bool | None:
        self._hand_partial_to_websockets()
        self.protocol.receive_eof()
        self.write_pending()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._hand_partial_to_websockets()
        self.protocol.receive_eof()  # idempotent: the state becomes CLOSED
        if self._close_timer is not None:
            self._close_timer.cancel()
        if not self.handshake.done():
            self.handshake.set_exception(WireClosed(f"connection lost ({exc or 'EOF'})"))
            self.handshake.exception()  # retrieved: nobody may be waiting any more
        self._said_closed()
        if not self.lost.done():
            self.lost.set_result(None)
        self.paused_writing = False
        if self._on_writable is not None:
            with contextlib.suppress(Exception):
                self._on_writable()

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self._on_writable is not None:
            self._on_writable()


__all__ = ["CLOSE_TIMEOUT_S", "Message", "WireClosed", "WsConnection"]
