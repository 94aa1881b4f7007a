"""Read pacing (node_agent/runtimes/read_tick.py) through the node's HTTP/1.1 pool against
a scripted chunked server on loopback: the test says when each piece is sent (and knows
when it is in the client's socket) and when the tick fires (a tick of 60 s never fires by
itself), and waits on the tick's own counter, never on time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from node_agent.config import ConfigError, load_options
from node_agent.runtimes import read_tick
from node_agent.runtimes.http1 import Http1Pool, Http1Response, UpstreamError
from node_agent.runtimes.read_tick import ReadTick

pytestmark = pytest.mark.timeout(30)

NEVER = 60.0  # a tick that does not fire during a test unless the test fires it


class Watched(ReadTick):
    """A tick whose count of paused reads can be awaited."""

    def __init__(self, tick_s: float, streams: int) -> None:
        self.changed = asyncio.Event()
        super().__init__(tick_s, streams)

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name == "paused_reads":
            self.changed.set()

    async def until(self, paused: int) -> None:
        while self.paused_reads != paused:
            self.changed.clear()
            await self.changed.wait()


class Chunked:
    """A server answering one request with a chunked body sent piece by piece by the test."""

    def __init__(self) -> None:
        self.pieces: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.queued = self.written = 0  # pieces given; pieces in the client's socket buffer
        self.wrote = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        try:
            while (piece := await self.pieces.get()) is not None:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if piece else b"0\r\n\r\n")
                await writer.drain()
                self.written += 1
                self.wrote.set()
        finally:
            writer.close()

    def send(self, piece: bytes) -> None:
        """`piece` as one chunk; b"": the body's end; then `cut` to drop the connection."""
        self.queued += 1
        self.pieces.put_nowait(piece)

    async def sent(self, piece: bytes) -> None:
        """`send`, and return once it is in the client's socket buffer (loopback)."""
        self.send(piece)
        while self.written < self.queued:
            self.wrote.clear()
            await self.wrote.wait()

    def cut(self) -> None:
        self.pieces.put_nowait(None)

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *_: object) -> None:
        self.server.close()


@pytest.fixture
async def served() -> AsyncIterator[tuple[Chunked, int]]:
    server = Chunked()
    async with server as port:
        yield server, port


async def reader_of(port: int, tick: ReadTick
                    ) -> tuple[Http1Pool, Http1Response, AsyncIterator[bytes]]:
    pool = Http1Pool("127.0.0.1", port, tick=tick)
    response = await pool.request("POST", "/v1/chat/completions", b"{}")
    return pool, response, response.chunks()


async def next_of(chunks: AsyncIterator[bytes]) -> bytes:
    async with asyncio.timeout(10):  # a read never woken fails here rather than hangs
        return await anext(chunks)


async def not_before_the_tick(chunks: AsyncIterator[bytes]) -> asyncio.Future[bytes]:
    """The reader's next piece, asked for; checked not to come while the loop turns."""
    waiting = asyncio.ensure_future(next_of(chunks))
    for _ in range(5):  # the loop turns (and would read a socket that is read)
        await asyncio.sleep(0)
    assert not waiting.done()
    return waiting


async def paced_after_b(server: Chunked, chunks: AsyncIterator[bytes], tick: Watched) -> None:
    """A, then B within a tick of it: both go on at once; reading then waits for the tick."""
    server.send(b"data: A\n\n")
    assert await next_of(chunks) == b"data: A\n\n"  # the first read: not paced
    assert (tick.paused_reads, tick.open) == (0, 1)
    server.send(b"data: B\n\n")
    assert await next_of(chunks) == b"data: B\n\n"  # at once, all the same
    await tick.until(paused=1)


async def test_under_load_a_stream_read_again_within_a_tick_waits_for_it_then_one_read(
    served: tuple[Chunked, int],
) -> None:
    server, port = served
    tick = Watched(NEVER, streams=1)
    pool, response, chunks = await reader_of(port, tick)
    try:
        await paced_after_b(server, chunks, tick)
        assert response._conn.tick_paused
        await server.sent(b"data: C\n\n")  # in the socket, not read before the tick
        await server.sent(b"data: D\n\n")
        waiting = await not_before_the_tick(chunks)
        tick.fire()  # reading again: C and D in one read, one piece (one token frame)
        assert await waiting == b"data: C\n\ndata: D\n\n"
        assert tick.ticks == 1
        await tick.until(paused=2)  # read within a tick of B: waits for the next one
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
        pool.close()
    assert tick.open == 0


async def test_the_end_of_the_answer_is_read_at_the_tick_and_ends_the_stream(
    served: tuple[Chunked, int],
) -> None:
    server, port = served
    tick = Watched(NEVER, streams=1)
    pool, _, chunks = await reader_of(port, tick)
    try:
        await paced_after_b(server, chunks, tick)
        await server.sent(b"data: [DONE]\n\n")
        await server.sent(b"")  # the chunked body's end
        waiting = await not_before_the_tick(chunks)
        tick.fire()
        assert await waiting == b"data: [DONE]\n\n"
        with pytest.raises(StopAsyncIteration):
            await next_of(chunks)
        assert tick.open == 0
    finally:
        pool.close()


async def test_a_connection_cut_while_reading_waits_fails_the_reader_after_the_tick(
    served: tuple[Chunked, int],
) -> None:
    server, port = served
    tick = Watched(NEVER, streams=1)
    pool, _, chunks = await reader_of(port, tick)
    try:
        await paced_after_b(server, chunks, tick)
        await server.sent(b"data: C\n\n")
        server.cut()
        tick.fire()  # C is read (the cut waits for the next tick: reading waits again)
        assert await next_of(chunks) == b"data: C\n\n"
        await tick.until(paused=2)
        tick.fire()
        with pytest.raises(UpstreamError):
            await next_of(chunks)
        assert tick.open == 0
    finally:
        pool.close()


async def test_a_stream_closed_while_reading_waits_is_no_longer_counted(
    served: tuple[Chunked, int],
) -> None:
    server, port = served
    tick = Watched(NEVER, streams=1)
    pool, response, chunks = await reader_of(port, tick)
    try:
        await paced_after_b(server, chunks, tick)
        response.close()  # the client left mid-stream: its connection closes
        assert tick.open == 0
        assert not response._conn.tick_paused
        tick.fire()  # nothing to resume
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
        pool.close()


@pytest.mark.parametrize(("tick_s", "streams"), [(NEVER, 2), (0.0, 1)])
async def test_below_the_threshold_or_with_no_tick_reading_never_waits(
    served: tuple[Chunked, int], tick_s: float, streams: int,
) -> None:
    server, port = served
    tick = Watched(tick_s, streams)
    pool, response, chunks = await reader_of(port, tick)
    try:
        for piece in (b"data: A\n\n", b"data: B\n\n", b"data: C\n\n"):
            server.send(piece)
            assert await next_of(chunks) == piece  # no tick fires in this test
        assert (tick.paused_reads, tick.ticks) == (0, 0)
        assert not response._conn.tick_paused
        assert tick.open == (1 if tick_s else 0)  # a tick of 0 does not even count streams
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
        pool.close()


async def test_the_shared_tick_fires_on_its_own_within_its_time(
    served: tuple[Chunked, int],
) -> None:
    server, port = served
    tick = Watched(0.002, streams=1)
    pool, _, chunks = await reader_of(port, tick)
    try:
        server.send(b"data: A\n\n")
        assert await next_of(chunks) == b"data: A\n\n"
        got = b""
        for piece in (b"data: B\n\n", b"data: C\n\n", b"data: D\n\n"):
            server.send(piece)
        while len(got) < 27:  # whatever the timing, every piece comes, in order
            got += await next_of(chunks)
        assert got == b"data: B\n\ndata: C\n\ndata: D\n\n"
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
        pool.close()


def test_the_settings_are_a_tick_of_0_to_2_ms_and_a_stream_count() -> None:
    opts = load_options({}, env={"MESHGATE_CONFIG": "/dev/null", "MESHGATE_STREAM_TICK_MS": "0",
                                 "MESHGATE_STREAM_TICK_STREAMS": "64"})
    assert (opts.stream_tick_ms, opts.stream_tick_streams) == (0.0, 64)
    defaults = load_options({}, env={"MESHGATE_CONFIG": "/dev/null"})
    assert (defaults.stream_tick_ms, defaults.stream_tick_streams) == (2.0, 16)
    for name, value, says in (("MESHGATE_STREAM_TICK_MS", "2.5", "stream_tick_ms"),
                              ("MESHGATE_STREAM_TICK_MS", "-1", "stream_tick_ms"),
                              ("MESHGATE_STREAM_TICK_STREAMS", "0", "stream_tick_streams")):
        with pytest.raises(ConfigError, match=says):
            load_options({}, env={"MESHGATE_CONFIG": "/dev/null", name: value})
    with pytest.raises(ValueError, match="0 to 2 ms"):
        read_tick.configure(0.003, 16)
    before = (read_tick.READ_TICK.tick_s, read_tick.READ_TICK.streams)
    try:
        read_tick.configure(0.001, 8)
        assert (read_tick.READ_TICK.tick_s, read_tick.READ_TICK.streams) == (0.001, 8)
    finally:
        read_tick.configure(*before)
