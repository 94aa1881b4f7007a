"""A TCP fault-injection proxy for loopback tests (node <-> coordinator tunnel port).

    proxy = FaultProxy("127.0.0.1", coordinator_port)
    port = await proxy.start()          # listens on 127.0.0.1:port, forwards to the target
    ... connect the node to ws://127.0.0.1:{port}/ ...
    proxy.delay(0.05)                   # each chunk arrives 50 ms later (latency, not a cap)
    proxy.throttle(64_000)              # at most 64 kB/s each way
    proxy.stall()                       # forward nothing either way; sockets stay open, no FIN
    proxy.resume()                      # undo stall()
    proxy.flip_byte(100, "down")        # invert the byte after the next 100 bytes target->client
    proxy.drop()                        # abort every connection (RST)
    proxy.refuse()                      # also RST new connections until heal()
    proxy.heal()                        # undo everything: no delay, throttle, stall, flip, refuse
    await proxy.stop()

"up" is client -> target, "down" is target -> client. Controls apply at once to live
connections and to later ones. From synchronous tests (e2e tests drive subprocesses) use
`ThreadedFaultProxy`, which runs a `FaultProxy` on its own loop in a thread and offers the
same controls, safe to call from any thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

Direction = Literal["up", "down"]
T = TypeVar("T")

_CHUNK = 65536
_QUEUE = 64  # chunks buffered per direction before the proxy stops reading (TCP backpressure)


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Flip:
    """One armed byte flip: skip `after` bytes, then invert the next byte."""

    def __init__(self, after: int) -> None:
        self.remaining = after

    def apply(self, data: bytes) -> tuple[bytes, bool]:
        if self.remaining >= len(data):
            self.remaining -= len(data)
            return data, False
        i = self.remaining
        return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :], True


class _Connection:
    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        target: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.target = target
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        legs: list[tuple[Direction, asyncio.StreamReader, asyncio.StreamWriter]] = [
            ("up", self.client[0], self.target[1]),
            ("down", self.target[0], self.client[1]),
        ]
        for direction, reader, writer in legs:
            queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUE)
            self.tasks.append(asyncio.create_task(self._read(reader, queue)))
            self.tasks.append(asyncio.create_task(self._write(direction, queue, writer)))
        try:
            done, _ = await asyncio.wait(self.tasks, return_when=asyncio.FIRST_EXCEPTION)
            if any(not task.cancelled() and task.exception() is not None for task in done):
                self.abort()  # one side broke: break the other too, as a real middlebox would
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for _, writer in (self.client, self.target):
                writer.close()

    async def _read(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        while True:
            data = await reader.read(_CHUNK)
            await queue.put((time.monotonic(), data) if data else None)
            if not data:
                return

    async def _write(
        self,
        direction: Direction,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        writer: asyncio.StreamWriter,
    ) -> None:
        proxy = self.proxy
        while True:
            item = await queue.get()
            await proxy._flowing.wait()
            if item is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            arrived, data = item
            wait = arrived + proxy._delay - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            while data:
                await proxy._flowing.wait()  # a stall can begin in the middle of a chunk
                rate = proxy._rate
                size = len(data) if rate is None else max(1, min(len(data), int(rate / 20)))
                piece, data = data[:size], data[size:]
                flip = proxy._flips.get(direction)
                if flip is not None:
                    piece, done = flip.apply(piece)
                    if done:
                        del proxy._flips[direction]
                        proxy.flipped += 1
                writer.write(piece)
                await writer.drain()
                proxy.bytes[direction] += len(piece)
                if rate is not None:
                    await asyncio.sleep(len(piece) / rate)

    def abort(self) -> None:
        """RST both sides and stop the pumps (they may be parked on a stall or a full
        queue, where a dead socket would never wake them)."""
        for _, writer in (self.client, self.target):
            _rst(writer)
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """Forwards every TCP connection on 127.0.0.1:port to (target_host, target_port)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port: int | None = None
        self.accepted = 0  # connections accepted since start
        self.flipped = 0  # bytes flipped so far
        self.bytes: dict[Direction, int] = {"up": 0, "down": 0}  # bytes forwarded
        self._server: asyncio.Server | None = None
        self._live: set[_Connection] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._delay = 0.0
        self._rate: float | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._flips: dict[Direction, _Flip] = {}
        self._refusing = False

    @property
    def connections(self) -> int:
        """Connections being forwarded now."""
        return len(self._live)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        handlers = list(self._handlers)
        if handlers:
            # aborted connections end their handlers; cancel only what still hangs
            _, pending = await asyncio.wait(handlers, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- controls (call on the proxy's loop; ThreadedFaultProxy for other threads) -------

    def delay(self, seconds: float) -> None:
        """Deliver every chunk `seconds` after it arrived, both ways (0 to stop)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._delay = float(seconds)

    def throttle(self, bytes_per_second: float | None) -> None:
        """Forward at most this many bytes per second in each direction (None: no cap)."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("throttle must be > 0 bytes per second, or None")
        self._rate = None if bytes_per_second is None else float(bytes_per_second)

    def stall(self) -> None:
        """Stop forwarding both ways silently: no data, no FIN, sockets stay open."""
        self._flowing.clear()

    def resume(self) -> None:
        """Undo `stall()`; what was held back is forwarded in order."""
        self._flowing.set()

    def flip_byte(self, after_bytes: int, direction: Direction = "down") -> None:
        """Invert one byte in `direction`: the first byte after `after_bytes` more are
        forwarded that way (counted over all connections; once)."""
        if direction not in ("up", "down"):
            raise ValueError('direction must be "up" or "down"')
        if after_bytes < 0:
            raise ValueError("after_bytes must be >= 0")
        self._flips[direction] = _Flip(after_bytes)

    def drop(self) -> None:
        """Abort every live connection on both sides (RST, no FIN)."""
        for conn in list(self._live):
            conn.abort()

    def refuse(self) -> None:
        """Reset every new connection at once (the target looks down) until `heal()`."""
        self._refusing = True

    def heal(self) -> None:
        """Back to a clean wire: no delay, throttle, stall, pending flip or refusal."""
        self._delay = 0.0
        self._rate = None
        self._flips.clear()
        self._refusing = False
        self._flowing.set()

    # -- internals -----------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            self.accepted += 1
            if self._refusing:
                _rst(writer)
                return
            try:
                target = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                _rst(writer)
                return
            conn = _Connection(self, (reader, writer), target)
            self._live.add(conn)
            try:
                await conn.run()
            finally:
                self._live.discard(conn)
        finally:
            self._handlers.discard(task)


class ThreadedFaultProxy:
    """A `FaultProxy` on its own event loop in a daemon thread, for synchronous tests.

    with ThreadedFaultProxy("127.0.0.1", port) as proxy:
        subprocess.Popen([... f"ws://127.0.0.1:{proxy.port}/" ...])
        proxy.stall(); ...; proxy.heal()

    Every control is forwarded to the proxy's loop and waited for, so it has taken effect
    when the call returns; safe from any thread.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._proxy = FaultProxy(target_host, target_port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self) -> int:
        ready: concurrent.futures.Future[asyncio.AbstractEventLoop] = concurrent.futures.Future()

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            ready.set_result(loop)
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name="faultproxy", daemon=True)
        self._thread.start()
        self._loop = ready.result(timeout=10)
        self.port = self._await(self._proxy.start())
        return self.port

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        try:
            self._await(self._proxy.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop = None
            self._thread = None

    def __enter__(self) -> ThreadedFaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _await(self, coro: Any, timeout: float = 30.0) -> Any:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the proxy is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        async def call() -> T:
            return fn(*args)

        result: T = self._await(call())
        return result

    def delay(self, seconds: float) -> None:
        self._call(self._proxy.delay, seconds)

    def throttle(self, bytes_per_second: float | None) -> None:
        self._call(self._proxy.throttle, bytes_per_second)

    def stall(self) -> None:
        self._call(self._proxy.stall)

    def resume(self) -> None:
        self._call(self._proxy.resume)

    def flip_byte(self, after_bytes: int, direction: Direction = "down") -> None:
        self._call(self._proxy.flip_byte, after_bytes, direction)

    def drop(self) -> None:
        self._call(self._proxy.drop)

    def refuse(self) -> None:
        self._call(self._proxy.refuse)

    def heal(self) -> None:
        self._call(self._proxy.heal)

    @property
    def connections(self) -> int:
        return self._call(lambda: self._proxy.connections)

    @property
    def accepted(self) -> int:
        return self._call(lambda: self._proxy.accepted)

    @property
    def flipped(self) -> int:
        return self._call(lambda: self._proxy.flipped)

    def bytes_forwarded(self, direction: Direction) -> int:
        return self._call(lambda: self._proxy.bytes[direction])


__all__ = ["Direction", "FaultProxy", "ThreadedFaultProxy"]
