"""Credit flow control in the Mux, over one real loopback Link.

Everything is measured in queued bytes and credit, never in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mux_pair import Pair, mux_pair

from tunnel import ClosedError, Frame, FrameError, FrameType, Mux, Stream, TunnelError
from tunnel.constants import INITIAL_CONNECTION_WINDOW, INITIAL_STREAM_WINDOW, MAX_WINDOW

SETTLE = 30.0
MB = 1024 * 1024


async def _source(stream: Stream, frame: Frame) -> None:
    """Node handler: send `size` bytes in `chunk`-byte DATA frames, then END."""
    size, chunk = frame.body["size"], frame.body.get("chunk", 16384)
    sent = 0
    with contextlib.suppress(TunnelError):
        while sent < size:
            n = min(chunk, size - sent)
            await stream.send(FrameType.DATA, bytes([sent % 251]) * n)
            sent += n
        await stream.send(FrameType.END, {"sent": sent})


async def _read_all(stream: Stream) -> tuple[int, Frame]:
    total = 0
    async for frame in stream:
        if frame.type == FrameType.DATA:
            total += len(frame.body)
        else:
            return total, frame
    raise AssertionError("no END")


async def _until(predicate: object) -> None:
    async with asyncio.timeout(SETTLE):
        while not predicate():  # type: ignore[operator]  # noqa: ASYNC110
            await asyncio.sleep(0.005)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = await mux_pair(node_on_stream=_source)
    yield p
    await p.close()


async def test_a_stuck_consumer_does_not_stop_other_streams_nor_buffer_past_its_window(
    pair: Pair,
) -> None:
    stuck = await pair.coord_mux.open({"size": 2 * MB})  # nobody reads this one yet
    moving = await pair.coord_mux.open({"size": 8 * MB, "chunk": 50_000})
    total, end = await asyncio.wait_for(_read_all(moving), SETTLE)
    assert (total, end.type, end.body) == (8 * MB, FrameType.END, {"sent": 8 * MB})

    # the stuck stream's sender used up its credit and waits; its queue is full, not more
    node_side = pair.node_mux._streams[stuck.id]
    await _until(lambda: node_side.send_credit == 0)
    assert stuck.buffered == INITIAL_STREAM_WINDOW
    assert stuck.peak_buffered <= INITIAL_STREAM_WINDOW
    assert pair.coord_mux.buffered == INITIAL_STREAM_WINDOW
    assert moving.peak_buffered <= INITIAL_STREAM_WINDOW

    # reading it now lets it finish; its queue never held more than the window
    total, end = await asyncio.wait_for(_read_all(stuck), SETTLE)
    assert total == 2 * MB
    assert end.type == FrameType.END
    assert stuck.peak_buffered <= INITIAL_STREAM_WINDOW
    # all the connection credit came back, up to what is granted in batches
    await _until(
        lambda: (
            pair.node_mux.send_credit
            >= INITIAL_CONNECTION_WINDOW - pair.coord_mux.connection_window // 2
        )
    )


async def test_a_body_larger_than_the_window_goes_in_pieces_as_credit_comes() -> None:
    blob = hashlib.sha256(b"x").digest() * (3 * MB // 32)

    async def big(stream: Stream, frame: Frame) -> None:
        await stream.send(FrameType.DATA, blob)  # one call, 3 MB
        await stream.send(FrameType.END, {})

    p = await mux_pair(node_on_stream=big)
    try:
        stream = await p.coord_mux.open({})
        parts = []
        async for frame in stream:
            if frame.type == FrameType.DATA:
                assert len(frame.body) <= INITIAL_STREAM_WINDOW
                parts.append(frame.body)
        assert b"".join(parts) == blob
        assert len(parts) > 1
        assert stream.peak_buffered <= INITIAL_STREAM_WINDOW
    finally:
        await p.close()


async def test_larger_configured_windows_are_granted_at_open() -> None:
    window = 4 * INITIAL_STREAM_WINDOW
    p = await mux_pair(
        node_on_stream=_source,
        coord_mux={"stream_window": window, "connection_window": 2 * INITIAL_CONNECTION_WINDOW},
    )
    try:
        stuck = await p.coord_mux.open({"size": 2 * MB})
        await _until(lambda: stuck.id in p.node_mux._streams)
        node_side = p.node_mux._streams[stuck.id]
        await _until(lambda: node_side.send_credit == 0 and stuck.buffered == window)
        assert stuck.peak_buffered == window
        await _until(lambda: p.node_mux.send_credit == 2 * INITIAL_CONNECTION_WINDOW - window)
        total, _ = await asyncio.wait_for(_read_all(stuck), SETTLE)
        assert total == 2 * MB
    finally:
        await p.close()


def test_windows_below_the_protocol_minimum_are_refused(pair: Pair) -> None:
    with pytest.raises(ValueError, match="stream_window"):
        Mux(pair.node_link, initiator=True, stream_window=1024)
    with pytest.raises(ValueError, match="connection_window"):
        Mux(pair.node_link, initiator=True, connection_window=MAX_WINDOW + 1)


async def test_cancel_wakes_a_sender_waiting_for_credit_and_returns_the_credit() -> None:
    failed: asyncio.Queue[BaseException] = asyncio.Queue()

    async def blocked(stream: Stream, frame: Frame) -> None:
        try:
            await stream.send(FrameType.DATA, bytes(2 * MB))
        except ClosedError as exc:
            await failed.put(exc)

    p = await mux_pair(node_on_stream=blocked)
    try:
        stream = await p.coord_mux.open({})
        await _until(lambda: stream.buffered == INITIAL_STREAM_WINDOW)
        await stream.send(FrameType.CANCEL, None)
        error = await asyncio.wait_for(failed.get(), SETTLE)
        assert "ended" in str(error)
        # the unread 256 KiB no longer hold connection credit on the coordinator
        assert p.coord_mux._ungranted == INITIAL_STREAM_WINDOW
        assert not p.node_link.closed
    finally:
        await p.close()


async def test_data_past_the_stream_credit_is_a_protocol_violation() -> None:
    hold = asyncio.Event()

    async def cheat(stream: Stream, frame: Frame) -> None:
        body = bytes(INITIAL_STREAM_WINDOW // 2)
        with contextlib.suppress(TunnelError):
            for _ in range(3):  # DATA straight on the link, past the stream's window
                await stream._mux.link.send(Frame(FrameType.DATA, stream.id, 0, 0, body))
        await hold.wait()

    p = await mux_pair(node_on_stream=cheat)
    try:
        stream = await p.coord_mux.open({})
        with pytest.raises(FrameError, match="past its credit"):
            await asyncio.wait_for(p.coord_run, SETTLE)
        await asyncio.wait_for(p.node_run, SETTLE)  # the node sees the 1002 close
        assert p.coord_link.closed
        assert p.node_link.closed
        with pytest.raises(ClosedError):
            await stream.recv()
        with pytest.raises(ClosedError):
            await p.coord_mux.open({})
    finally:
        hold.set()
        await p.close()


async def test_data_past_the_connection_credit_is_a_protocol_violation() -> None:
    hold = asyncio.Event()

    async def cheat(stream: Stream, frame: Frame) -> None:
        body = bytes(MB)
        with contextlib.suppress(TunnelError):
            for _ in range(5):  # 5 MiB on one stream: inside its window, not the connection's
                await stream._mux.link.send(Frame(FrameType.DATA, stream.id, 0, 0, body))
        await hold.wait()

    p = await mux_pair(node_on_stream=cheat, coord_mux={"stream_window": 8 * MB})
    try:
        await p.coord_mux.open({})
        with pytest.raises(FrameError, match="connection's credit"):
            await asyncio.wait_for(p.coord_run, SETTLE)
    finally:
        hold.set()
        await p.close()


async def test_a_window_that_overflows_the_credit_is_a_protocol_violation(pair: Pair) -> None:
    await pair.node_link.send(Frame(FrameType.WINDOW, 0, 0, 0, {"credit": MAX_WINDOW}))
    with pytest.raises(FrameError, match="past"):
        await asyncio.wait_for(pair.coord_run, SETTLE)


async def test_many_token_streams_grant_credit_in_batches_not_per_frame(pair: Pair) -> None:
    streams = [await pair.coord_mux.open({"size": 40_000, "chunk": 40}) for _ in range(16)]
    results = await asyncio.wait_for(asyncio.gather(*(_read_all(s) for s in streams)), SETTLE)
    assert all(total == 40_000 for total, _ in results)
    # 16 x 1000 token frames read; WINDOW frames: none per stream (40 kB < half a window)
    # and only a few for the connection
    sent_windows = pair.coord_link._session._streams.next_seq(0, 0)
    assert sent_windows < 10


async def test_small_bodies_are_never_split_at_a_credit_edge(pair: Pair) -> None:
    # 2,000 x 300 bytes: well past one window, so the sender runs out of credit often
    stream = await pair.coord_mux.open({"size": 600_000, "chunk": 300})
    await _until(lambda: stream.buffered >= INITIAL_STREAM_WINDOW - 300)
    sizes = []
    async for frame in stream:
        if frame.type == FrameType.DATA:
            sizes.append(len(frame.body))
    assert sizes == [300] * 2000
    assert stream.peak_buffered <= INITIAL_STREAM_WINDOW


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 70_000), min_size=1, max_size=40),
    pauses=st.lists(st.integers(0, 3), min_size=1, max_size=10),
    streams=st.integers(1, 4),
)
def test_any_mix_of_body_sizes_and_read_pauses_arrives_whole_within_the_window(
    sizes: list[int], pauses: list[int], streams: int
) -> None:
    """Whatever the senders' body sizes and however the consumers dawdle: no deadlock,
    every byte arrives in order, no queue ever holds more than its window."""

    async def send_sizes(stream: Stream, frame: Frame) -> None:
        for index, size in enumerate(sizes):
            await stream.send(FrameType.DATA, bytes([index % 256]) * size)
        await stream.send(FrameType.END, {})

    async def consume(stream: Stream) -> bytes:
        parts = []
        index = 0
        async for frame in stream:
            if frame.type == FrameType.DATA:
                parts.append(frame.body)
                for _ in range(pauses[index % len(pauses)]):
                    await asyncio.sleep(0)  # let the sender and the reader run ahead
                index += 1
        return b"".join(parts)

    async def scenario() -> None:
        p = await mux_pair(node_on_stream=send_sizes)
        try:
            opened = [await p.coord_mux.open({}) for _ in range(streams)]
            got = await asyncio.wait_for(asyncio.gather(*(consume(s) for s in opened)), 60)
            expected = b"".join(bytes([i % 256]) * size for i, size in enumerate(sizes))
            for stream, data in zip(opened, got, strict=True):
                assert data == expected
                assert stream.peak_buffered <= INITIAL_STREAM_WINDOW
        finally:
            await p.close()

    asyncio.run(scenario())
