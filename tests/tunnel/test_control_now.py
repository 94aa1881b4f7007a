"""`Mux(on_control_now=...)`: control frames handled in the reader, order kept.

A coordinator gets a telemetry frame a second from every node; handling the ones
that need no waiting in the link's reader saves a task switch each. What it may
not do is overtake a frame still queued for (or being handled by) the async
`on_control`. Real loopback tunnel (tests/tunnel/mux_pair.py).
"""

from __future__ import annotations

import asyncio

from tests.tunnel.mux_pair import mux_pair
from tunnel import Frame, FrameType


async def test_frames_the_sync_handler_takes_skip_the_queue_and_keep_their_order() -> None:
    order: list[tuple[str, int]] = []
    release = asyncio.Event()
    done = asyncio.Event()

    async def slow(frame: Frame) -> None:  # the async path: an INVENTORY that waits
        if frame.body["n"] == 0:
            await release.wait()
        order.append(("async", frame.body["n"]))
        if frame.body["n"] == 9:
            done.set()

    def now(frame: Frame) -> bool:
        if frame.type != FrameType.TELEMETRY:
            return False
        order.append(("now", frame.body["n"]))
        if frame.body["n"] == 9:
            done.set()
        return True

    pair = await mux_pair(coord_on_control=slow, coord_mux={"on_control_now": now})
    try:
        await pair.node_mux.send_control(FrameType.TELEMETRY, {"n": -1})
        await pair.node_mux.send_control(FrameType.INVENTORY, {"n": 0})
        for n in range(1, 10):  # while the inventory is being handled: queued behind it
            await pair.node_mux.send_control(FrameType.TELEMETRY, {"n": n})
        async with asyncio.timeout(5):  # the reader had every frame: 9 wait in the queue
            while len(pair.coord_mux._control) < 9:  # noqa: ASYNC110 (no event for it)
                await asyncio.sleep(0.01)
        assert order == [("now", -1)]  # only the first went now
        release.set()
        await asyncio.wait_for(done.wait(), 5)
        assert order == [("now", -1), *(("async", n) for n in range(10))]
        order.clear()
        done.clear()
        for n in range(7, 10):  # the queue is empty again: straight to the sync handler
            await pair.node_mux.send_control(FrameType.TELEMETRY, {"n": n})
        await asyncio.wait_for(done.wait(), 5)
        assert order == [("now", 7), ("now", 8), ("now", 9)]
    finally:
        await pair.close()


async def test_a_frame_the_sync_handler_declines_goes_to_on_control() -> None:
    got: list[int] = []
    done = asyncio.Event()

    async def on_control(frame: Frame) -> None:
        got.append(frame.body["n"])
        done.set()

    def now(frame: Frame) -> bool:
        if frame.body["n"] == 1:
            raise RuntimeError("a handler bug")  # logged; the frame counts as handled
        return False

    pair = await mux_pair(coord_on_control=on_control, coord_mux={"on_control_now": now})
    try:
        await pair.node_mux.send_control(FrameType.TELEMETRY, {"n": 1})
        await pair.node_mux.send_control(FrameType.TELEMETRY, {"n": 2})
        await asyncio.wait_for(done.wait(), 5)
        assert got == [2]
    finally:
        await pair.close()
