"""GOAWAY (graceful close) and rekeying under live streams, over a real loopback Link."""

from __future__ import annotations

import asyncio
import os

import pytest
from mux_pair import mux_pair

from tunnel import ClosedError, Frame, FrameType, Stream

SETTLE = 30.0


class Gated:
    """A node handler that sends `chunks` DATA frames, each once the test lets it."""

    def __init__(self) -> None:
        self.go = asyncio.Queue[int]()
        self.started = asyncio.Event()

    async def __call__(self, stream: Stream, frame: Frame) -> None:
        self.started.set()
        for index in range(frame.body["chunks"]):
            await self.go.get()
            await stream.send(FrameType.DATA, f"tok{index}".encode())
        await stream.send(FrameType.END, {"n": frame.body["chunks"]})


async def test_coordinator_goaway_lets_open_streams_finish_and_refuses_new_ones() -> None:
    seen: list[Frame] = []
    got_goaway = asyncio.Event()

    async def node_control(frame: Frame) -> None:
        seen.append(frame)
        if frame.type == FrameType.GOAWAY:
            got_goaway.set()

    handler = Gated()
    p = await mux_pair(
        node_on_stream=handler, node_on_control=node_control, coord_on_stream=handler
    )
    try:
        stream = await p.coord_mux.open({"chunks": 3})
        await asyncio.wait_for(handler.started.wait(), SETTLE)
        handler.go.put_nowait(0)
        first = await asyncio.wait_for(stream.recv(), SETTLE)
        assert first.body == b"tok0"

        shutdown = asyncio.create_task(p.coord_mux.shutdown("coordinator restarting", grace=60))
        await asyncio.wait_for(got_goaway.wait(), SETTLE)
        assert seen[-1].body == {"reason": "coordinator restarting", "last_stream": 0}
        assert p.node_mux.peer_going_away == "coordinator restarting"
        with pytest.raises(ClosedError, match="going away"):
            await p.node_mux.open({"chunks": 1})  # the node opens nothing new here
        with pytest.raises(ClosedError, match="going away"):
            await p.coord_mux.open({"chunks": 1})  # nor does the coordinator
        assert not shutdown.done()  # it waits for the open stream

        handler.go.put_nowait(1)
        handler.go.put_nowait(2)
        rest = [frame async for frame in stream]
        assert [f.body for f in rest] == [b"tok1", b"tok2", {"n": 3}]
        await asyncio.wait_for(shutdown, SETTLE)
        await asyncio.wait_for(asyncio.gather(p.node_run, p.coord_run), SETTLE)
        assert p.node_link.closed_reason is not None
        assert p.coord_link.closed
    finally:
        await p.close()


async def test_node_goaway_stops_the_coordinator_opening_streams_at_once() -> None:
    goaway = asyncio.Event()

    async def coord_control(frame: Frame) -> None:
        if frame.type == FrameType.GOAWAY:
            goaway.set()

    handler = Gated()
    p = await mux_pair(node_on_stream=handler, coord_on_control=coord_control)
    try:
        live = await p.coord_mux.open({"chunks": 1})
        await asyncio.wait_for(handler.started.wait(), SETTLE)
        await p.node_mux.goaway("node draining")
        await p.node_mux.goaway("twice is harmless")
        await asyncio.wait_for(goaway.wait(), SETTLE)
        assert p.coord_mux.peer_going_away == "node draining"
        with pytest.raises(ClosedError, match="node draining"):
            await p.coord_mux.open({"chunks": 1})

        # an OPEN that crossed the GOAWAY in flight is refused with 503, not served
        p.coord_mux.conn.peer_going_away = None
        crossed = await p.coord_mux.open({"chunks": 1})
        refused = await asyncio.wait_for(crossed.recv(), SETTLE)
        assert refused.type == FrameType.ERROR
        assert refused.body["status"] == 503

        handler.go.put_nowait(0)  # the stream opened before GOAWAY still completes
        frames = [frame async for frame in live]
        assert [f.type for f in frames] == [FrameType.DATA, FrameType.END]
        await asyncio.wait_for(p.node_mux.wait_idle(), SETTLE)
        assert p.node_mux.open_streams == 0
    finally:
        await p.close()


async def test_shutdown_closes_after_its_grace_even_if_a_stream_hangs() -> None:
    handler = Gated()
    p = await mux_pair(node_on_stream=handler)
    try:
        stream = await p.coord_mux.open({"chunks": 1})
        await asyncio.wait_for(handler.started.wait(), SETTLE)
        await asyncio.wait_for(p.coord_mux.shutdown("bye", grace=0.05), SETTLE)
        with pytest.raises(ClosedError):
            await asyncio.wait_for(stream.recv(), SETTLE)
        await asyncio.wait_for(asyncio.gather(p.node_run, p.coord_run), SETTLE)
    finally:
        await p.close()


async def test_streams_survive_rekeys_in_both_directions_mid_stream() -> None:
    blobs = [os.urandom(20_000) for _ in range(40)]

    async def echo(stream: Stream, frame: Frame) -> None:
        """Send every blob, then echo what the coordinator sends until an empty DATA."""
        for blob in blobs:
            await stream.send(FrameType.DATA, blob)
        received = []
        while (got := await stream.recv()).body:
            received.append(got.body)
        await stream.send(FrameType.DATA, b"".join(received))
        await stream.send(FrameType.END, {})

    p = await mux_pair(node_on_stream=echo)
    try:
        p.node_link.rekey_after_messages = 4
        p.coord_link.rekey_after_messages = 5
        node_key = p.node_link._session._send._key
        coord_key = p.coord_link._session._send._key
        stream = await p.coord_mux.open({})
        got = b""
        while len(got) < 40 * 20_000:  # DATA may come in other pieces as credit allows
            got += (await asyncio.wait_for(stream.recv(), SETTLE)).body
        assert got == b"".join(blobs)
        upward = os.urandom(7_000)
        for start in range(0, len(upward), 100):
            await stream.send(FrameType.DATA, upward[start : start + 100])
        await stream.send(FrameType.DATA, b"")
        echoed = await asyncio.wait_for(stream.recv(), SETTLE)
        assert echoed.body == upward
        assert (await asyncio.wait_for(stream.recv(), SETTLE)).type == FrameType.END
        # both send keys changed (at least 40 / 4 and 70 / 5 times), nothing was lost
        assert p.node_link._session._send._key != node_key
        assert p.coord_link._session._send._key != coord_key
        assert p.node_link._session.sent_since_rekey < 4
        assert not p.node_link.closed
    finally:
        await p.close()


async def test_recv_under_asyncio_timeout_loses_nothing() -> None:
    """What the coordinator's dispatch does per frame (no task per frame, as wait_for)."""
    release = asyncio.Event()

    async def later(stream: Stream, frame: Frame) -> None:
        await release.wait()
        await stream.send(FrameType.DATA, b"late")
        await stream.send(FrameType.END, {})

    p = await mux_pair(node_on_stream=later)
    try:
        stream = await p.coord_mux.open({})
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await stream.recv()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0):
                await stream.recv()
        release.set()
        async with asyncio.timeout(SETTLE):
            assert (await stream.recv()).body == b"late"
            assert (await stream.recv()).type == FrameType.END
    finally:
        await p.close()


async def test_on_end_calls_back_when_the_end_arrives_and_not_for_data() -> None:
    """What the coordinator's write pacing waits on besides its tick (write_tick.py): a
    stream that nobody reads hears of its END at once, and of nothing before it."""
    gated = Gated()
    p = await mux_pair(node_on_stream=gated)
    try:
        stream = await p.coord_mux.open({"chunks": 2})
        ended = asyncio.Event()
        stream.on_end(ended.set)
        await gated.go.put(0)
        async with asyncio.timeout(SETTLE):
            assert (await stream.recv()).type == FrameType.DATA
        assert not ended.is_set()  # no call back for DATA
        await gated.go.put(1)  # the second DATA, then END
        async with asyncio.timeout(SETTLE):
            await ended.wait()
        queued = [stream.recv_nowait(), stream.recv_nowait()]
        assert [f.type if f else None for f in queued] == [FrameType.DATA, FrameType.END]
        lost = await p.coord_mux.open({"chunks": 2})
        died = asyncio.Event()
        lost.on_end(died.set)
        await p.node_link.close()  # the link dies under an unfinished stream: told too
        async with asyncio.timeout(SETTLE):
            await died.wait()
    finally:
        await p.close()
