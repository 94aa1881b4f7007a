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
waits on websockets' write buffer (drain).

GOAWAY (`Mux.goaway`, `Mux.shutdown`): the side going away opens no more
streams and refuses the peer's new ones (ERROR 503); the peer's `open` raises
ClosedError from then on; streams already open run to their end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from tunnel.constants import INITIAL_CONNECTION_WINDOW, INITIAL_STREAM_WINDOW, MAX_WINDOW
from tunnel.errors import ClosedError, FrameError, TunnelError
from tunnel.frames import TERMINAL, Frame, FrameType
from tunnel.ws import Link

log = logging.getLogger(__name__)

STREAM_SEND_TYPES = frozenset(
    {FrameType.DATA, FrameType.END, FrameType.ERROR, FrameType.CANCEL, FrameType.WINDOW}
)
# DATA bodies up to this size wait for credit for all of their bytes and go as one frame;
# larger ones go in pieces as credit allows. Below half the smallest window, so the
# credit a drained receiver leaves (over half a window) always admits one.
WHOLE_DATA = 16 * 1024
OnStream = Callable[["Stream", Frame], Awaitable[None]]
OnControl = Callable[[Frame], Awaitable[None]]


class _Credit:
    """Bytes the peer allows us to send, and the senders waiting for more."""

    def __init__(self, initial: int) -> None:
        self.available = initial
        self.dead: str | None = None
        self.waiters: set[asyncio.Future[None]] = set()

    def grant(self, n: int) -> bool:
        """Add credit; False if that would pass MAX_WINDOW (the peer broke the protocol)."""
        if self.available + n > MAX_WINDOW:
            return False
        self.available += n
        self._wake()
        return True

    def kill(self, reason: str) -> None:
        if self.dead is None:
            self.dead = reason
        self._wake()

    def _wake(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()


async def _wait_credit(stream: _Credit, connection: _Credit, need: int) -> None:
    """Until both have `need` bytes of credit; ClosedError as soon as either is dead."""
    while True:
        for credit in (stream, connection):
            if credit.dead is not None:
                raise ClosedError(credit.dead)
        if stream.available >= need and connection.available >= need:
            return
        waiter = asyncio.get_running_loop().create_future()
        stream.waiters.add(waiter)
        connection.waiters.add(waiter)
        try:
            await waiter
        finally:
            stream.waiters.discard(waiter)
            connection.waiters.discard(waiter)


class Stream:
    def __init__(self, mux: Mux, stream_id: int) -> None:
        self.id = stream_id
        self._mux = mux
        self._queue: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._sent_end = False
        self._peer_ended = False
        self._dead: str | None = None
        # flow control, sending side
        self._credit = _Credit(INITIAL_STREAM_WINDOW)
        self._send_lock = asyncio.Lock()
        # flow control, receiving side
        self.buffered = 0  # DATA body bytes queued, not yet read by the consumer
        self.peak_buffered = 0  # the most that were ever queued at once
        self._recv_total = 0  # DATA body bytes received on this stream
        self._recv_limit = INITIAL_STREAM_WINDOW  # what we allowed the peer to send, in all
        self._ungranted = 0  # bytes read but not yet granted back
        self._released = False  # the connection credit of queued bytes was given back

    @property
    def closed(self) -> bool:
        return self._sent_end or self._peer_ended or self._dead is not None

    @property
    def send_credit(self) -> int:
        """Bytes of DATA this side may send on this stream now."""
        return self._credit.available

    async def send(self, type: FrameType, body: Any) -> None:
        """Send DATA, END, ERROR, CANCEL or WINDOW on this stream.

        DATA waits for credit (stream and connection) and goes in pieces if credit is
        short; WINDOW grants the peer extra credit on top of what reading grants."""
        if type not in STREAM_SEND_TYPES:
            raise TunnelError(f"{type.name} cannot be sent on a stream")
        if self._dead is not None:
            raise ClosedError(f"stream {self.id}: {self._dead}")
        if type == FrameType.DATA and isinstance(body, bytes) and body:
            await self._send_data(body)
            return
        if type == FrameType.WINDOW:
            credit = body.get("credit") if isinstance(body, dict) else None
            if isinstance(credit, int) and not isinstance(credit, bool) and credit > 0:
                self._recv_limit += credit  # the peer may now send that much more
        await self._mux.link.send(Frame(type, self.id, 0, 0, body))
        if type in TERMINAL:
            self._sent_end = True
            self._credit.kill(f"stream {self.id} ended")
            self._mux._forget(self.id)
            self._release()
            self._queue.put_nowait(None)

    async def _send_data(self, body: bytes) -> None:
        mux = self._mux
        async with self._send_lock:
            n = len(body)
            if n <= WHOLE_DATA:  # the common case, a token event: one frame, no copy
                if self._credit.available < n or mux._credit.available < n:
                    await _wait_credit(self._credit, mux._credit, n)
                self._credit.available -= n
                mux._credit.available -= n
                await mux.link.send(Frame(FrameType.DATA, self.id, 0, 0, body))
                return
            view = memoryview(body)
            while view:
                # a small body (a token event) goes whole, never split by a credit edge
                need = len(view) if len(view) <= WHOLE_DATA else 1
                await _wait_credit(self._credit, mux._credit, need)
                n = min(len(view), self._credit.available, mux._credit.available)
                piece, view = bytes(view[:n]), view[n:]
                self._credit.available -= n
                mux._credit.available -= n
                await mux.link.send(Frame(FrameType.DATA, self.id, 0, 0, piece))

    async def recv(self) -> Frame:
        """The peer's next frame on this stream; ClosedError once it ended or the link died."""
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # every later call fails the same way
            raise ClosedError(f"stream {self.id}: {self._dead or 'ended'}")
        if item.type == FrameType.DATA:
            self._consumed(len(item.body))
        return item

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Frame:
        """Frames up to and including the peer's END, ERROR or CANCEL."""
        if self._peer_ended and self._queue.empty():
            raise StopAsyncIteration
        try:
            return await self.recv()
        except ClosedError:
            if self._dead is None:
                raise StopAsyncIteration from None
            raise

    # -- called by the mux's reader --------------------------------------------------

    def _accept_data(self, n: int) -> str | None:
        """Count n received DATA bytes; why that breaks the peer's credit, or None."""
        self._recv_total += n
        if self._recv_total > self._recv_limit:
            return (
                f"stream {self.id}: the peer sent {self._recv_total - self._recv_limit} "
                "bytes of DATA past its credit"
            )
        return None

    def _deliver(self, frame: Frame) -> None:
        if frame.type == FrameType.DATA:
            self.buffered += len(frame.body)
            self.peak_buffered = max(self.peak_buffered, self.buffered)
        self._queue.put_nowait(frame)
        if frame.type in TERMINAL:
            self._peer_ended = True
            self._credit.kill(f"stream {self.id} ended by the peer")
            self._queue.put_nowait(None)

    def _kill(self, reason: str) -> None:
        """The link died under an unfinished stream: it fails at once, queued frames
        included (it can never be complete; one that got its END stays readable)."""
        if self._dead is None:
            self._dead = reason
            self._credit.kill(f"stream {self.id}: {reason}")
            while not self._queue.empty():
                self._queue.get_nowait()
            self.buffered = 0
            self._queue.put_nowait(None)

    # -- credit back to the peer -----------------------------------------------------

    def _consumed(self, n: int) -> None:
        self.buffered -= n
        if self._released:
            return  # its connection credit went back when this side ended the stream
        self._mux._conn_consumed(n)
        if self.closed:
            return  # nothing more will come on it
        self._ungranted += n
        if self._ungranted >= self._mux.stream_window // 2:
            grant, self._ungranted = self._ungranted, 0
            self._recv_limit += grant
            self._mux._grant(self.id, grant)

    def _release(self) -> None:
        """This side ended the stream: queued bytes no longer hold connection credit."""
        if not self._released:
            self._released = True
            self._mux._conn_consumed(self.buffered)


class Mux:
    def __init__(
        self,
        link: Link,
        *,
        initiator: bool,
        on_stream: OnStream | None = None,
        on_control: OnControl | None = None,
        stream_window: int = INITIAL_STREAM_WINDOW,
        connection_window: int = INITIAL_CONNECTION_WINDOW,
    ) -> None:
        if not INITIAL_STREAM_WINDOW <= stream_window <= MAX_WINDOW:
            raise ValueError(f"stream_window must be in {INITIAL_STREAM_WINDOW}..{MAX_WINDOW}")
        if not INITIAL_CONNECTION_WINDOW <= connection_window <= MAX_WINDOW:
            raise ValueError(
                f"connection_window must be in {INITIAL_CONNECTION_WINDOW}..{MAX_WINDOW}"
            )
        self.link = link
        self.initiator = initiator
        self.on_stream = on_stream
        self.on_control = on_control
        self.stream_window = stream_window
        self.connection_window = connection_window
        self._streams: dict[int, Stream] = {}
        self._next_id = 1 if initiator else 2
        self._tasks: set[asyncio.Task[None]] = set()
        self._control: asyncio.Queue[Frame] = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()
        # flow control
        self._credit = _Credit(INITIAL_CONNECTION_WINDOW)
        self._recv_total = 0
        self._recv_limit = INITIAL_CONNECTION_WINDOW
        self._ungranted = 0
        # GOAWAY
        self.going_away: str | None = None  # why this side sent GOAWAY
        self.peer_going_away: str | None = None  # why the peer did
        self._last_peer_stream = 0

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def send_credit(self) -> int:
        """Bytes of DATA this side may send on the connection now (all streams together)."""
        return self._credit.available

    @property
    def buffered(self) -> int:
        """DATA bytes queued on open streams, not yet read by their consumers."""
        return sum(stream.buffered for stream in self._streams.values())

    async def open(self, body: dict[str, Any]) -> Stream:
        """Send OPEN on a fresh stream id and return the stream.

        ClosedError once either side sent GOAWAY: open it on another connection."""
        if self.peer_going_away is not None:
            raise ClosedError(f"the peer is going away: {self.peer_going_away}")
        if self.going_away is not None:
            raise ClosedError(f"this side is going away: {self.going_away}")
        stream_id, self._next_id = self._next_id, self._next_id + 2
        stream = self._streams[stream_id] = Stream(self, stream_id)
        self._idle.clear()
        try:
            await self.link.send(Frame(FrameType.OPEN, stream_id, 0, 0, body))
        except BaseException:
            self._forget(stream_id)
            raise
        self._grant_initial(stream)
        return stream

    async def send_control(self, type: FrameType, body: Any) -> None:
        await self.link.send(Frame(type, 0, 0, 0, body))

    async def goaway(self, reason: str = "shutting down") -> None:
        """Tell the peer to open no more streams here; streams already open go on."""
        if self.going_away is not None:
            return
        self.going_away = reason
        body = {"reason": reason, "last_stream": self._last_peer_stream}
        await self.send_control(FrameType.GOAWAY, body)

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
        Returns when the link closed; raises FrameError when the peer broke the protocol."""
        control = self._spawn(self._control_loop())
        reason = "link closed"
        try:
            if self.connection_window > INITIAL_CONNECTION_WINDOW:
                self._recv_limit = self.connection_window
                self._grant(0, self.connection_window - INITIAL_CONNECTION_WINDOW)
            async for frame in self.link:
                problem = self._dispatch(frame)
                if problem is not None:
                    await self.link.fail(problem)
        except FrameError as exc:
            reason = f"link failed: {exc}"
            raise
        finally:
            if reason == "link closed" and self.link.closed_reason:
                reason = f"link closed: {self.link.closed_reason}"
            self._credit.kill(reason)
            for stream in list(self._streams.values()):
                stream._kill(reason)
            self._streams.clear()
            self._idle.set()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await control

    def _dispatch(self, frame: Frame) -> str | None:
        """Route one frame; a protocol violation (returned as text) ends the session."""
        if frame.type == FrameType.WINDOW:
            return self._on_window(frame)
        if frame.stream_id == 0:
            if frame.type == FrameType.GOAWAY:
                reason = frame.body.get("reason")
                self.peer_going_away = reason if isinstance(reason, str) else "going away"
            self._control.put_nowait(frame)
            return None
        if frame.type == FrameType.OPEN:
            self._accept_stream(frame)
            return None
        return self._on_stream_frame(frame)

    def _on_stream_frame(self, frame: Frame) -> str | None:
        if frame.type == FrameType.DATA:
            self._recv_total += len(frame.body)
            if self._recv_total > self._recv_limit:
                over = self._recv_total - self._recv_limit
                return f"the peer sent {over} bytes of DATA past the connection's credit"
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            # crossed our END or CANCEL in flight; nobody wants it
            if frame.type == FrameType.DATA:
                self._conn_consumed(len(frame.body))
            return None
        if frame.type == FrameType.DATA:
            problem = stream._accept_data(len(frame.body))
            if problem is not None:
                return problem
        if frame.type in TERMINAL:
            self._forget(frame.stream_id)
        stream._deliver(frame)
        return None

    def _on_window(self, frame: Frame) -> str | None:
        credit: int = frame.body["credit"]
        if frame.stream_id == 0:
            target = self._credit
        else:
            stream = self._streams.get(frame.stream_id)
            if stream is None:
                return None  # the stream ended meanwhile
            target = stream._credit
        if not target.grant(credit):
            return f"WINDOW on stream {frame.stream_id} grows the credit past {MAX_WINDOW}"
        return None

    def _accept_stream(self, frame: Frame) -> None:
        peer_parity = 0 if self.initiator else 1
        if frame.stream_id % 2 != peer_parity or self.on_stream is None:
            log.warning("refusing stream %s opened by the peer", frame.stream_id)
            self._spawn(self._refuse(frame.stream_id, 400, "this side does not accept streams"))
            return
        if self.going_away is not None:
            self._spawn(self._refuse(frame.stream_id, 503, f"going away: {self.going_away}"))
            return
        self._last_peer_stream = max(self._last_peer_stream, frame.stream_id)
        stream = self._streams[frame.stream_id] = Stream(self, frame.stream_id)
        self._idle.clear()
        self._grant_initial(stream)
        self._spawn(self._serve(stream, frame))

    async def _refuse(self, stream_id: int, status: int, message: str) -> None:
        with contextlib.suppress(TunnelError):
            body = {"status": status, "message": message}
            await self.link.send(Frame(FrameType.ERROR, stream_id, 0, 0, body))

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
        stream._release()  # nobody will read what is still queued

    # -- granting credit -------------------------------------------------------------

    def _grant_initial(self, stream: Stream) -> None:
        if self.stream_window > INITIAL_STREAM_WINDOW:
            stream._recv_limit = self.stream_window
            self._grant(stream.id, self.stream_window - INITIAL_STREAM_WINDOW)

    def _conn_consumed(self, n: int) -> None:
        self._ungranted += n
        if self._ungranted >= self.connection_window // 2:
            grant, self._ungranted = self._ungranted, 0
            self._recv_limit += grant
            self._grant(0, grant)

    def _grant(self, stream_id: int, credit: int) -> None:
        """Send WINDOW from a task of its own: a consumer's recv never waits on the link
        (and so cannot be cancelled half way through handing over a frame)."""
        if credit > 0 and not self.link.closed:
            self._spawn(self._send_window(stream_id, credit))

    async def _send_window(self, stream_id: int, credit: int) -> None:
        with contextlib.suppress(TunnelError):  # the stream or the link ended meanwhile
            await self.link.send(Frame(FrameType.WINDOW, stream_id, 0, 0, {"credit": credit}))

    async def _control_loop(self) -> None:
        while True:
            frame = await self._control.get()
            if self.on_control is None:
                continue
            try:
                await self.on_control(frame)
            except TunnelError as exc:
                log.info("control frame %s not handled: %s", frame.type.name, exc)
            except Exception:
                log.exception("control frame %s handler failed", frame.type.name)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def until_cancelled(stream: Stream, work: Coroutine[Any, Any, None]) -> bool:
    """Run `work` (the answer to a stream the peer opened) until it ends, or until the
    peer sends CANCEL on `stream` or the link dies, which cancels it. True if cancelled."""
    task = asyncio.create_task(work)
    watch = asyncio.create_task(_wait_cancel(stream))
    done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    cancelled = watch in done and not task.done()
    if cancelled:
        task.cancel()
    watch.cancel()
    for t in (task, watch):
        with contextlib.suppress(asyncio.CancelledError, TunnelError):
            await t
    return cancelled


async def _wait_cancel(stream: Stream) -> None:
    with contextlib.suppress(ClosedError):
        while True:
            frame = await stream.recv()
            if frame.type == FrameType.CANCEL:
                return
