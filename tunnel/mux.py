"""Many request streams over one Link.

Stream ids: the node (initiator) opens odd ids, the coordinator even ids;
stream 0 is the control stream. One reader (`Mux.run`) pulls frames off the
link and drops each into its stream's queue, so it never waits on a slow
consumer; control frames go to one queue served by one task, in order.

TODO(flow control): the per-stream queues are unbounded. WINDOW frames
(per-stream and per-connection credit) come in a later change; until then a
consumer that stops reading lets its queue grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from tunnel.errors import ClosedError, FrameError, TunnelError
from tunnel.frames import TERMINAL, Frame, FrameType
from tunnel.ws import Link

log = logging.getLogger(__name__)

STREAM_SEND_TYPES = frozenset(
    {FrameType.DATA, FrameType.END, FrameType.ERROR, FrameType.CANCEL, FrameType.WINDOW}
)
OnStream = Callable[["Stream", Frame], Awaitable[None]]
OnControl = Callable[[Frame], Awaitable[None]]


class Stream:
    def __init__(self, mux: Mux, stream_id: int) -> None:
        self.id = stream_id
        self._mux = mux
        self._queue: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._sent_end = False
        self._peer_ended = False
        self._dead: str | None = None

    @property
    def closed(self) -> bool:
        return self._sent_end or self._peer_ended or self._dead is not None

    async def send(self, type: FrameType, body: Any) -> None:
        """Send DATA, END, ERROR, CANCEL or WINDOW on this stream."""
        if type not in STREAM_SEND_TYPES:
            raise TunnelError(f"{type.name} cannot be sent on a stream")
        if self._dead is not None:
            raise ClosedError(f"stream {self.id}: {self._dead}")
        await self._mux.link.send(Frame(type, self.id, 0, 0, body))
        if type in TERMINAL:
            self._sent_end = True
            self._mux._forget(self.id)
            self._queue.put_nowait(None)

    async def recv(self) -> Frame:
        """The peer's next frame on this stream; ClosedError once it ended or the link died."""
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # every later call fails the same way
            raise ClosedError(f"stream {self.id}: {self._dead or 'ended'}")
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

    def _deliver(self, frame: Frame) -> None:
        self._queue.put_nowait(frame)
        if frame.type in TERMINAL:
            self._peer_ended = True
            self._queue.put_nowait(None)

    def _kill(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
            self._queue.put_nowait(None)


class Mux:
    def __init__(
        self,
        link: Link,
        *,
        initiator: bool,
        on_stream: OnStream | None = None,
        on_control: OnControl | None = None,
    ) -> None:
        self.link = link
        self.initiator = initiator
        self.on_stream = on_stream
        self.on_control = on_control
        self._streams: dict[int, Stream] = {}
        self._next_id = 1 if initiator else 2
        self._tasks: set[asyncio.Task[None]] = set()
        self._control: asyncio.Queue[Frame] = asyncio.Queue()

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def open(self, body: dict[str, Any]) -> Stream:
        """Send OPEN on a fresh stream id and return the stream."""
        stream_id, self._next_id = self._next_id, self._next_id + 2
        stream = self._streams[stream_id] = Stream(self, stream_id)
        try:
            await self.link.send(Frame(FrameType.OPEN, stream_id, 0, 0, body))
        except BaseException:
            self._streams.pop(stream_id, None)
            raise
        return stream

    async def send_control(self, type: FrameType, body: Any) -> None:
        await self.link.send(Frame(type, 0, 0, 0, body))

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    async def run(self) -> None:
        """Read until the link closes; then every open stream's recv raises ClosedError.
        Returns when the link closed; raises FrameError when the peer broke the protocol."""
        control = self._spawn(self._control_loop())
        reason = "link closed"
        try:
            async for frame in self.link:
                self._dispatch(frame)
        except FrameError as exc:
            reason = f"link failed: {exc}"
            raise
        finally:
            for stream in list(self._streams.values()):
                stream._kill(reason)
            self._streams.clear()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await control

    def _dispatch(self, frame: Frame) -> None:
        if frame.stream_id == 0:
            self._control.put_nowait(frame)
            return
        if frame.type == FrameType.OPEN:
            self._accept_stream(frame)
            return
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            return  # crossed our END or CANCEL in flight; nobody wants it
        if frame.type in TERMINAL:
            self._forget(frame.stream_id)
        stream._deliver(frame)

    def _accept_stream(self, frame: Frame) -> None:
        peer_parity = 0 if self.initiator else 1
        if frame.stream_id % 2 != peer_parity or self.on_stream is None:
            log.warning("refusing stream %s opened by the peer", frame.stream_id)
            self._spawn(self._refuse(frame.stream_id))
            return
        stream = self._streams[frame.stream_id] = Stream(self, frame.stream_id)
        self._spawn(self._serve(stream, frame))

    async def _refuse(self, stream_id: int) -> None:
        with contextlib.suppress(TunnelError):
            body = {"status": 400, "message": "this side does not accept streams"}
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
