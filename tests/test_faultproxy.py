"""The fault proxy on a plain TCP echo server on loopback.

No speed is asserted: only what must hold however slow the machine is (nothing arrives
before a delay or during a stall; a throttle never lets more through than rate x time).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from tests.faultproxy import FaultProxy, ThreadedFaultProxy


class Echo:
    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.errors: list[BaseException] = []
        self.ended = asyncio.Event()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError as exc:
            self.errors.append(exc)
        finally:
            self.ended.set()
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    server = Echo()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy(echo: Echo) -> AsyncIterator[FaultProxy]:
    fp = FaultProxy("127.0.0.1", echo.port)
    await fp.start()
    yield fp
    await fp.stop()


async def dial(fp: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert fp.port is not None
    return await asyncio.open_connection("127.0.0.1", fp.port)


async def until(predicate: Callable[[], bool]) -> None:
    """Poll a condition the proxy exposes no event for (bounded: 10 s)."""
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def read_to_end(reader: asyncio.StreamReader) -> str:
    """Read until the connection ends: "eof" for a FIN; raises ConnectionResetError on RST."""
    async with asyncio.timeout(10):
        while await reader.read(65536):
            pass
    return "eof"


async def write_and_read(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    async with asyncio.timeout(10):
        return await reader.readexactly(len(data))


async def test_forwards_intact_both_ways_and_counts_connections(proxy: FaultProxy) -> None:
    payload = os.urandom(1 << 20)
    reader, writer = await dial(proxy)
    writer.write(payload)
    got = await reader.readexactly(len(payload))
    assert got == payload
    assert proxy.connections == 1
    assert proxy.bytes == {"up": len(payload), "down": len(payload)}
    writer.write_eof()
    assert await reader.read() == b""  # the FIN went through both ways
    writer.close()
    await until(lambda: proxy.connections == 0)
    assert proxy.accepted == 1


async def test_delay_holds_each_chunk_back(proxy: FaultProxy) -> None:
    proxy.delay(0.5)
    reader, writer = await dial(proxy)
    writer.write(b"hello")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):  # well under the 2 x 0.5 s round trip
            await reader.readexactly(5)
    proxy.delay(0)
    assert await reader.readexactly(5) == b"hello"
    writer.close()


async def test_throttle_never_exceeds_its_rate(proxy: FaultProxy) -> None:
    rate = 20_000
    proxy.throttle(rate)
    reader, writer = await dial(proxy)
    payload = os.urandom(30_000)
    start = time.monotonic()
    writer.write(payload)
    got = b""
    while len(got) < 5_000:
        got += await reader.read(65536)
    elapsed = time.monotonic() - start
    # one slice (rate / 20 bytes) may go before its pause
    assert proxy.bytes["up"] <= rate * elapsed + rate / 20
    proxy.throttle(None)
    got += await reader.readexactly(len(payload) - len(got))
    assert got == payload
    writer.close()


async def test_stall_holds_everything_without_closing(proxy: FaultProxy, echo: Echo) -> None:
    reader, writer = await dial(proxy)
    writer.write(b"before")
    assert await reader.readexactly(6) == b"before"
    proxy.stall()
    writer.write(b"during")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await reader.read(1)
    assert proxy.connections == 1
    assert not reader.at_eof()
    assert not echo.ended.is_set()  # no FIN and no RST reached the target
    proxy.resume()
    assert await reader.readexactly(6) == b"during"
    writer.close()


async def test_stall_holds_back_the_fin_too(proxy: FaultProxy, echo: Echo) -> None:
    reader, writer = await dial(proxy)
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"
    proxy.stall()
    writer.write_eof()
    await asyncio.sleep(0.2)
    assert not echo.ended.is_set()
    proxy.heal()
    assert await reader.read() == b""
    await until(echo.ended.is_set)
    writer.close()


@pytest.mark.parametrize("direction", ["up", "down"])
async def test_flip_byte_inverts_exactly_one_byte(proxy: FaultProxy, direction: str) -> None:
    reader, writer = await dial(proxy)
    writer.write(b"\x00" * 10)
    assert await reader.readexactly(10) == b"\x00" * 10  # before arming: untouched
    proxy.flip_byte(1000, direction)  # type: ignore[arg-type]
    payload = bytes(5000)
    writer.write(payload)
    got = await reader.readexactly(len(payload))
    assert [i for i, b in enumerate(got) if b] == [1000]
    assert got[1000] == 0xFF
    assert proxy.flipped == 1
    writer.write(payload)  # a flip happens once
    assert await reader.readexactly(len(payload)) == payload
    writer.close()


async def test_drop_resets_both_sides(proxy: FaultProxy, echo: Echo) -> None:
    reader, writer = await dial(proxy)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    proxy.drop()
    with pytest.raises(ConnectionResetError):
        await read_to_end(reader)  # a FIN would return "eof" instead
    await until(echo.ended.is_set)
    await until(lambda: proxy.connections == 0)
    writer.close()
    # the proxy still accepts new connections after a drop
    reader, writer = await dial(proxy)
    writer.write(b"again")
    assert await reader.readexactly(5) == b"again"
    writer.close()


async def test_refuse_until_heal(proxy: FaultProxy) -> None:
    proxy.refuse()
    reader, writer = await dial(proxy)
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await write_and_read(reader, writer, b"x")
    writer.close()
    proxy.heal()
    reader, writer = await dial(proxy)
    writer.write(b"y")
    assert await reader.readexactly(1) == b"y"
    writer.close()
    assert proxy.accepted == 2


async def test_target_down_resets_the_client(echo: Echo) -> None:
    fp = FaultProxy("127.0.0.1", echo.port)
    await fp.start()
    await echo.stop()
    assert echo.server is not None
    await echo.server.wait_closed()
    try:
        reader, writer = await dial(fp)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            async with asyncio.timeout(10):
                await reader.readexactly(1)
        writer.close()
    finally:
        await fp.stop()


async def test_bad_arguments_are_refused(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="delay"):
        proxy.delay(-1)
    with pytest.raises(ValueError, match="throttle"):
        proxy.throttle(0)
    with pytest.raises(ValueError, match="direction"):
        proxy.flip_byte(1, "sideways")  # type: ignore[arg-type]


# -- the threaded proxy, driven from plain synchronous code ------------------------------


@contextlib.contextmanager
def sync_echo() -> Iterator[int]:
    """A blocking echo server in a thread (no asyncio on the test's side at all)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)  # accept() is not woken by close() from another thread
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with conn:
                try:
                    while data := conn.recv(65536):
                        conn.sendall(data)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        data = sock.recv(n - len(got))
        if not data:
            raise EOFError
        got += data
    return got


def recv_to_end(sock: socket.socket) -> None:
    while sock.recv(65536):
        pass


def test_threaded_proxy_from_sync_code() -> None:
    with sync_echo() as port, ThreadedFaultProxy("127.0.0.1", port) as proxy:
        assert proxy.port is not None
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(b"hello")
            assert recv_exactly(sock, 5) == b"hello"
            assert proxy.connections == 1

            proxy.stall()
            sock.sendall(b"stalled")
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(1)
            sock.settimeout(10)
            proxy.resume()
            assert recv_exactly(sock, 7) == b"stalled"

            proxy.flip_byte(2, "up")
            sock.sendall(b"\x00" * 4)
            assert recv_exactly(sock, 4) == b"\x00\x00\xff\x00"
            assert proxy.flipped == 1
            assert proxy.bytes_forwarded("up") == 16

            proxy.drop()
            with pytest.raises(ConnectionResetError):
                recv_to_end(sock)  # a FIN would return instead
        proxy.heal()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(b"again")
            assert recv_exactly(sock, 5) == b"again"
        assert proxy.accepted == 2


def test_threaded_proxy_controls_need_a_running_proxy() -> None:
    proxy = ThreadedFaultProxy("127.0.0.1", 9)
    with pytest.raises(RuntimeError, match="not running"):
        proxy.stall()
    proxy.stop()  # harmless when never started


async def test_drop_during_a_stall_with_full_queues_ends_the_connection(
    proxy: FaultProxy, echo: Echo
) -> None:
    reader, writer = await dial(proxy)
    proxy.stall()
    chunk = os.urandom(1 << 20)
    # far more than the proxy queues and the loopback sockets hold: the pumps park
    for _ in range(64):
        writer.write(chunk)
        if writer.transport.get_write_buffer_size() > 8 << 20:
            break
    await asyncio.sleep(0.2)
    assert proxy.connections == 1
    proxy.drop()
    await until(lambda: proxy.connections == 0)  # parked pumps were stopped, not left
    with pytest.raises(ConnectionError):
        await read_to_end(reader)
    writer.close()
