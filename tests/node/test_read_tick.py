"""Read pacing (node_agent/runtimes/read_tick.py) through the node's HTTP/1.1 pool against
a scripted chunked server on loopback: the test says when each piece is sent (and knows
when it is in the client's socket), how late the loop runs (a fixed lateness) and when the
tick fires (a tick of 60 s never fires by itself), and waits on the tick's own counter,
never on time. The pacing rules alone, time passed in: test_read_pacing.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from node_agent.config import ConfigError, load_options
from node_agent.runtimes import read_tick
from node_agent.runtimes.http1 import Http1Pool, Http1Response, UpstreamError
from node_agent.runtimes.read_tick import ReadTick

pytestmark = pytest.mark.timeout(30)

NEVER = 60.0  # a tick that does not fire during a test unless the test fires it


class Watched(ReadTick):
    """Pacing engaged with a fixed lateness (the tick: `cap_s`) from the start, or
    never engaged (`engaged` False); its count of paused reads can be awaited."""

    def __init__(self, cap_s: float, streams: int, engaged: bool = True) -> None:
        self.changed = asyncio.Event()
        super().__init__(cap_s, streams=streams, fixed_lag_s=NEVER if engaged else 0.0)
        if engaged:
            self.observe(NEVER, now=0.0)
            assert self.engaged
            assert self.tick_s == cap_s

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


@dataclass
class Paced:
    """A stream read under engaged pacing, past A and B (see `paced`)."""

    server: Chunked
    tick: Watched
    response: Http1Response
    chunks: AsyncIterator[bytes]


@pytest.fixture
async def paced(served: tuple[Chunked, int]) -> AsyncIterator[Paced]:
    """A, then B within a tick of it: both go on at once; reading then waits for the tick."""
    server, port = served
    tick = Watched(NEVER, streams=1)
    pool, response, chunks = await reader_of(port, tick)
    try:
        server.send(b"data: A\n\n")
        assert await next_of(chunks) == b"data: A\n\n"  # the first read: not paced
        assert (tick.paused_reads, tick.open) == (0, 1)
        server.send(b"data: B\n\n")
        assert await next_of(chunks) == b"data: B\n\n"  # at once, all the same
        await tick.until(paused=1)
        yield Paced(server, tick, response, chunks)
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
        pool.close()


async def test_under_load_a_stream_read_again_within_a_tick_waits_for_it_then_one_read(
    paced: Paced,
) -> None:
    server, tick, chunks = paced.server, paced.tick, paced.chunks
    assert paced.response._conn.tick_paused
    await server.sent(b"data: C\n\n")  # in the socket, not read before the tick
    await server.sent(b"data: D\n\n")
    waiting = await not_before_the_tick(chunks)
    tick.fire()  # reading again: C and D in one read, one piece (one token frame)
    assert await waiting == b"data: C\n\ndata: D\n\n"
    assert tick.ticks == 1
    await tick.until(paused=2)  # read within a tick of B: waits for the next one
    await chunks.aclose()  # type: ignore[attr-defined]
    assert tick.open == 0


async def test_the_tick_counts_as_a_streams_last_read_so_a_paced_stream_reads_once_a_tick(
    paced: Paced,
) -> None:
    paced.response._conn.woken_at = float("-inf")  # B read long ago: only the tick is recent
    await paced.server.sent(b"data: C\n\n")
    waiting = await not_before_the_tick(paced.chunks)
    paced.tick.fire()
    assert await waiting == b"data: C\n\n"
    await paced.tick.until(paused=2)  # read at the tick: waits for the next, not one read more
    assert paced.response._conn.tick_paused


async def test_the_end_of_the_answer_is_read_at_the_tick_and_ends_the_stream(
    paced: Paced,
) -> None:
    await paced.server.sent(b"data: [DONE]\n\n")
    await paced.server.sent(b"")  # the chunked body's end
    waiting = await not_before_the_tick(paced.chunks)
    paced.tick.fire()
    assert await waiting == b"data: [DONE]\n\n"
    with pytest.raises(StopAsyncIteration):
        await next_of(paced.chunks)
    assert paced.tick.open == 0


async def test_a_connection_cut_while_reading_waits_fails_the_reader_after_the_tick(
    paced: Paced,
) -> None:
    await paced.server.sent(b"data: C\n\n")
    paced.server.cut()
    paced.tick.fire()  # C is read (the cut waits for the next tick: reading waits again)
    assert await next_of(paced.chunks) == b"data: C\n\n"
    await paced.tick.until(paused=2)
    paced.tick.fire()
    with pytest.raises(UpstreamError):
        await next_of(paced.chunks)
    assert paced.tick.open == 0


async def test_a_stream_closed_while_reading_waits_is_no_longer_counted(paced: Paced) -> None:
    paced.response.close()  # the client left mid-stream: its connection closes
    assert paced.tick.open == 0
    assert not paced.response._conn.tick_paused
    paced.tick.fire()  # nothing to resume


@pytest.mark.parametrize(("cap_s", "streams", "engaged"),
                         [(NEVER, 2, True), (NEVER, 1, False), (0.0, 1, True)])
async def test_below_the_floor_not_engaged_or_off_reading_never_waits(
    served: tuple[Chunked, int], cap_s: float, streams: int, engaged: bool,
) -> None:
    server, port = served
    tick = Watched(cap_s, streams, engaged)
    pool, response, chunks = await reader_of(port, tick)
    try:
        for piece in (b"data: A\n\n", b"data: B\n\n", b"data: C\n\n"):
            server.send(piece)
            assert await next_of(chunks) == piece  # no tick fires in this test
        assert (tick.paused_reads, tick.ticks) == (0, 0)
        assert not response._conn.tick_paused
        assert tick.open == (1 if cap_s else 0)  # a cap of 0 does not even count streams
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
        pool.close()


async def test_the_shared_tick_fires_on_its_own_within_its_time(
    served: tuple[Chunked, int],
) -> None:
    server, port = served
    tick = Watched(0.002, streams=1)  # engaged, a 2 ms tick that fires by itself
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


def test_the_settings_are_a_cap_an_engage_lag_and_a_stream_floor() -> None:
    opts = load_options({}, env={"MESHGATE_CONFIG": "/dev/null", "MESHGATE_STREAM_TICK_MS": "0",
                                 "MESHGATE_STREAM_TICK_ENGAGE_MS": "5",
                                 "MESHGATE_STREAM_TICK_STREAMS": "64"})
    assert (opts.stream_tick_ms, opts.stream_tick_engage_ms, opts.stream_tick_streams) == (
        0.0, 5.0, 64)
    defaults = load_options({}, env={"MESHGATE_CONFIG": "/dev/null"})
    assert (defaults.stream_tick_ms, defaults.stream_tick_engage_ms,
            defaults.stream_tick_streams) == (50.0, 2.0, 16)
    for name, value, says in (("MESHGATE_STREAM_TICK_MS", "1001", "stream_tick_ms"),
                              ("MESHGATE_STREAM_TICK_MS", "-1", "stream_tick_ms"),
                              ("MESHGATE_STREAM_TICK_ENGAGE_MS", "-1", "stream_tick_engage_ms"),
                              ("MESHGATE_STREAM_TICK_STREAMS", "0", "stream_tick_streams")):
        with pytest.raises(ConfigError, match=says):
            load_options({}, env={"MESHGATE_CONFIG": "/dev/null", name: value})
    with pytest.raises(ValueError, match="0 \\(off\\) or more"):
        read_tick.configure(-0.001)
    assert read_tick.fixed_lag({}) is None
    assert read_tick.fixed_lag({"MESHGATE_STREAM_LAG_MS": "20"}) == 0.02
    with pytest.raises(ValueError, match="MESHGATE_STREAM_LAG_MS"):
        read_tick.fixed_lag({"MESHGATE_STREAM_LAG_MS": "soon"})
    tick = read_tick.READ_TICK
    before = (tick.cap_s, tick.engage_s, tick.streams, tick.fixed_lag_s)
    try:
        read_tick.configure(0.1, 0.004, 8, 0.02)
        assert (tick.cap_s, tick.engage_s, tick.streams, tick.fixed_lag_s) == (0.1, 0.004, 8, 0.02)
    finally:
        read_tick.configure(*before)
