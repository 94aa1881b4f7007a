"""`until_cancelled`: the answer to a peer's stream runs until it ends or the peer cancels."""

from __future__ import annotations

import asyncio

from tests.tunnel.mux_pair import mux_pair
from tunnel import Frame, FrameType, Stream, until_cancelled


async def test_a_cancel_from_the_peer_stops_the_work_and_says_so() -> None:
    outcomes: asyncio.Queue[tuple[bool, bool]] = asyncio.Queue()
    started = asyncio.Event()

    async def on_stream(stream: Stream, frame: Frame) -> None:
        finished = False

        async def work() -> None:
            nonlocal finished
            started.set()
            await asyncio.sleep(30)  # a long generation
            finished = True

        outcomes.put_nowait((await until_cancelled(stream, work()), finished))

    pair = await mux_pair(coord_on_stream=on_stream)
    try:
        stream = await pair.node_mux.open({"hello": 1})
        await asyncio.wait_for(started.wait(), 10)
        await stream.send(FrameType.CANCEL, None)
        cancelled, finished = await asyncio.wait_for(outcomes.get(), 10)
        assert cancelled is True
        assert finished is False
    finally:
        await pair.close()


async def test_work_that_ends_by_itself_is_not_reported_cancelled() -> None:
    outcomes: asyncio.Queue[bool] = asyncio.Queue()

    async def on_stream(stream: Stream, frame: Frame) -> None:
        async def work() -> None:
            await stream.send(FrameType.END, {"ok": True})

        outcomes.put_nowait(await until_cancelled(stream, work()))

    pair = await mux_pair(coord_on_stream=on_stream)
    try:
        stream = await pair.node_mux.open({"hello": 1})
        assert (await asyncio.wait_for(stream.recv(), 10)).type == FrameType.END
        assert await asyncio.wait_for(outcomes.get(), 10) is False
    finally:
        await pair.close()


async def test_a_link_that_dies_under_the_work_stops_it() -> None:
    started, stopped = asyncio.Event(), asyncio.Event()
    finished = False

    async def on_stream(stream: Stream, frame: Frame) -> None:
        async def work() -> None:
            nonlocal finished
            started.set()
            try:
                await asyncio.sleep(30)
                finished = True
            finally:
                stopped.set()

        await until_cancelled(stream, work())

    pair = await mux_pair(coord_on_stream=on_stream)
    try:
        await pair.node_mux.open({"hello": 1})
        await asyncio.wait_for(started.wait(), 10)
        await pair.node_link.close()  # the node goes away mid-answer
        await asyncio.wait_for(stopped.wait(), 10)
        assert finished is False
    finally:
        await pair.close()


async def test_the_work_runs_in_the_callers_task_and_a_foreign_cancel_stays_a_cancel() -> None:
    outcomes: asyncio.Queue[str] = asyncio.Queue()
    started = asyncio.Event()
    handler: list[asyncio.Task[None]] = []

    async def on_stream(stream: Stream, frame: Frame) -> None:
        handler.append(asyncio.current_task())  # type: ignore[arg-type]

        async def work() -> None:
            assert asyncio.current_task() is handler[0]  # no task of its own
            started.set()
            await asyncio.sleep(30)

        try:
            await until_cancelled(stream, work())
            outcomes.put_nowait("returned")
        except asyncio.CancelledError:
            outcomes.put_nowait("cancelled")
            raise

    pair = await mux_pair(coord_on_stream=on_stream)
    try:
        await pair.node_mux.open({"hello": 1})
        await asyncio.wait_for(started.wait(), 10)
        handler[0].cancel()  # e.g. the coordinator shutting down: not the peer's CANCEL
        assert await asyncio.wait_for(outcomes.get(), 10) == "cancelled"
    finally:
        await pair.close()
