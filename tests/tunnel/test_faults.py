"""A node Mux and a coordinator Mux through a FaultProxy: what a broken wire does.

Real websockets, real Noise sessions on loopback; the proxy flips, stalls, drops,
delays or throttles the TCP bytes between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os

import pytest
from mux_pair import Pair, mux_pair

from tunnel import ClosedError, Frame, FrameError, FrameType, Stream, TunnelError
from tunnel.constants import MAX_MESSAGE
from tunnel.wire import WRITE_LIMIT
from tunnel.ws import WRITE_HIGH_WATER

SETTLE = 10.0  # generous bound for "promptly" on a loaded 2-core machine


async def _hold(stream: Stream, frame: Frame) -> None:
    """A node handler that answers "hello", then on each DATA from the coordinator sends
    that many random bytes, until the stream or the link ends."""
    await stream.send(FrameType.DATA, b"hello")
    with contextlib.suppress(TunnelError):
        while True:
            got = await stream.recv()
            if got.type != FrameType.DATA:
                return
            await stream.send(FrameType.DATA, os.urandom(int(got.body)))


async def _opened(pair: Pair) -> Stream:
    stream = await pair.coord_mux.open({})
    first = await asyncio.wait_for(stream.recv(), SETTLE)
    assert first.body == b"hello"
    return stream


async def _read_until_error(stream: Stream) -> None:
    async with asyncio.timeout(SETTLE):
        while True:
            await stream.recv()


async def _fails(stream: Stream) -> ClosedError:
    with pytest.raises(ClosedError) as info:
        await _read_until_error(stream)
    return info.value


@pytest.mark.parametrize("direction", ["up", "down"])
async def test_a_flipped_byte_ends_the_session_on_both_sides(direction: str) -> None:
    pair = await mux_pair(via_proxy=True, node_on_stream=_hold, coord_on_stream=_hold)
    assert pair.proxy is not None
    try:
        # one stream opened by each side, so both directions carry a big message
        to_node = await _opened(pair)
        to_coord = await pair.node_mux.open({})
        assert (await asyncio.wait_for(to_coord.recv(), SETTLE)).body == b"hello"
        pair.proxy.flip_byte(5000, direction)  # type: ignore[arg-type]
        # 40 kB of random bytes: one websocket message, the flip lands in its ciphertext
        if direction == "up":
            await to_node.send(FrameType.DATA, b"40000")  # the node answers upward
        else:
            await to_coord.send(FrameType.DATA, b"40000")  # the coordinator answers downward
        broken, other = (pair.coord_run, pair.node_run)
        if direction == "down":
            broken, other = other, broken
        with pytest.raises(FrameError, match="did not decrypt"):
            await asyncio.wait_for(broken, SETTLE)
        await asyncio.wait_for(other, SETTLE)  # the other side sees the 1002 close
        assert pair.proxy.flipped == 1
        for stream in (to_node, to_coord):
            await _fails(stream)
            with pytest.raises(ClosedError):
                await stream.send(FrameType.DATA, b"more")
        assert pair.node_link.closed
        assert pair.coord_link.closed
        with pytest.raises(TunnelError):
            await pair.coord_mux.open({})
    finally:
        await pair.close()


async def test_a_stall_is_detected_by_the_app_level_ping_within_its_deadline() -> None:
    interval, timeout = 0.2, 1.0
    pair = await mux_pair(
        via_proxy=True,
        node_on_stream=_hold,
        ping_interval=interval,
        ping_timeout=timeout,
    )
    assert pair.proxy is not None
    try:
        stream = await _opened(pair)
        await asyncio.sleep(2 * interval)
        assert pair.node_link.rtt_ms is not None  # pings flow while the wire is healthy
        assert pair.coord_link.rtt_ms is not None
        pair.proxy.stall()  # no bytes, no FIN, no RST: only a timeout can tell
        deadline = interval + timeout + SETTLE
        await asyncio.wait_for(asyncio.gather(pair.node_run, pair.coord_run), deadline)
        for link in (pair.node_link, pair.coord_link):
            assert link.closed_reason is not None
            assert "no PONG" in link.closed_reason
        error = await _fails(stream)
        assert "no PONG" in str(error)
    finally:
        await pair.close()


async def test_with_the_default_rules_a_stall_is_detected_by_each_side_within_its_bound() -> None:
    """The shape of the defaults, shrunk: the coordinator pings every `period`, the node
    only after `quiet` of silence; a stalled path (no bytes, no FIN) is dropped by the
    coordinator within period + timeout and by the node within quiet + timeout."""
    period, quiet, timeout = 0.3, 0.5, 0.5
    pair = await mux_pair(
        via_proxy=True,
        node_on_stream=_hold,
        ping_interval=period,
        ping_timeout=timeout,
        node_pings={"ping_interval": None, "ping_when_quiet": quiet, "ping_timeout": timeout},
    )
    assert pair.proxy is not None
    try:
        stream = await _opened(pair)
        await asyncio.wait_for(pair.coord_link.ping(wait=True), SETTLE)  # healthy path
        pair.proxy.stall()
        loop = asyncio.get_running_loop()
        stalled = loop.time()
        await asyncio.wait_for(pair.coord_run, period + timeout + SETTLE)
        await asyncio.wait_for(pair.node_run, quiet + timeout + SETTLE)
        assert loop.time() - stalled <= quiet + timeout + SETTLE
        for link in (pair.node_link, pair.coord_link):
            assert link.closed_reason is not None
            assert "no PONG" in link.closed_reason
        await _fails(stream)
    finally:
        await pair.close()


async def test_a_drop_closes_both_sides_promptly_and_fails_open_streams() -> None:
    pair = await mux_pair(via_proxy=True, node_on_stream=_hold, coord_on_stream=_hold)
    assert pair.proxy is not None
    try:
        to_node = await _opened(pair)
        to_coord = await pair.node_mux.open({})
        assert (await asyncio.wait_for(to_coord.recv(), SETTLE)).body == b"hello"
        pair.proxy.drop()
        await asyncio.wait_for(asyncio.gather(pair.node_run, pair.coord_run), SETTLE)
        for stream in (to_node, to_coord):
            await _fails(stream)
        assert pair.node_link.closed
        assert pair.coord_link.closed
        assert pair.coord_mux.open_streams == 0
        assert pair.node_mux.open_streams == 0
    finally:
        await pair.close()


async def _send_blob(stream: Stream, frame: Frame) -> None:
    """Send `size` seeded pseudo-random bytes in `chunk`-byte DATA frames, then END with
    their sha256."""
    size, chunk, seed = frame.body["size"], frame.body["chunk"], frame.body["seed"]
    blob = _blob(seed, size)
    for start in range(0, size, chunk):
        await stream.send(FrameType.DATA, blob[start : start + chunk])
    await stream.send(FrameType.END, {"sha256": hashlib.sha256(blob).hexdigest()})


def _blob(seed: int, size: int) -> bytes:
    out = bytearray()
    block = seed.to_bytes(8, "little")
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


async def _fetch(pair: Pair, size: int, chunk: int, seed: int) -> bytes:
    stream = await pair.coord_mux.open({"size": size, "chunk": chunk, "seed": seed})
    parts = []
    async for frame in stream:
        if frame.type == FrameType.DATA:
            parts.append(frame.body)
        else:
            assert frame.type == FrameType.END
            data = b"".join(parts)
            assert frame.body == {"sha256": hashlib.sha256(data).hexdigest()}
            return data
    raise AssertionError("stream ended without END")


@pytest.mark.parametrize(("delay", "rate"), [(0.02, None), (None, 400_000), (0.01, 800_000)])
async def test_streams_complete_intact_through_delay_and_throttle(
    delay: float | None, rate: int | None
) -> None:
    pair = await mux_pair(via_proxy=True, node_on_stream=_send_blob)
    assert pair.proxy is not None
    try:
        if delay is not None:
            pair.proxy.delay(delay)
        if rate is not None:
            pair.proxy.throttle(rate)
        sizes = [(100_000, 4096), (60_000, 150), (200_000, 65536), (1, 1)]
        got = await asyncio.wait_for(
            asyncio.gather(
                *(_fetch(pair, size, chunk, seed) for seed, (size, chunk) in enumerate(sizes))
            ),
            120,
        )
        for seed, ((size, _), data) in enumerate(zip(sizes, got, strict=True)):
            assert data == _blob(seed, size)
        assert pair.coord_mux.open_streams == 0
        assert not pair.node_link.closed
    finally:
        await pair.close()


async def test_a_stalled_path_blocks_link_send_instead_of_buffering_without_bound() -> None:
    """Control frames carry no credit: below the mux, the transport's write buffer
    (pause_writing) is what stops a sender whose bytes go nowhere."""
    pair = await mux_pair(via_proxy=True)
    assert pair.proxy is not None
    transport = pair.node_link._ws.transport
    pair.proxy.stall()
    sent = 0

    async def pump() -> None:
        nonlocal sent
        while True:
            body = {"blob": os.urandom(30_000)}  # incompressible: 30 kB on the wire
            await pair.node_link.send(Frame(FrameType.TELEMETRY, 0, 0, 0, body))
            sent += 1

    task = asyncio.create_task(pump())
    try:
        async with asyncio.timeout(SETTLE):
            last = -1
            while sent != last or transport.get_write_buffer_size() == 0:
                last = sent
                await asyncio.sleep(0.05)  # until the proxy and both kernels are full
        assert not task.done()
        # the sender waits in send for room: the writer waits for the transport to drain
        assert pair.node_link.queued_bytes > WRITE_HIGH_WATER
        # bounded: frames queued in the core and messages held encrypted by the
        # high-water mark (+ one frame), the transport's buffer by its high-water mark
        # (+ the message that crossed it), all sent by what the proxy and sockets hold
        assert pair.node_link.queued_bytes <= WRITE_HIGH_WATER + 31_000
        assert transport.get_write_buffer_size() <= WRITE_LIMIT + MAX_MESSAGE
        assert sent * 30_000 <= 64 * 1024 * 1024
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TunnelError):
            await task
        pair.proxy.drop()
        await pair.close()
