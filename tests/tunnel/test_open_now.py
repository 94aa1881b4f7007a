"""A request's OPEN on an idle link leaves inside `Mux.open` (`Link.sent(now=True)`), not
in the write round at the end of the loop turn; OPENs of a burst in one turn still leave
together in that round (over real loopback websockets, ws_harness.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tests.tunnel.ws_harness import Coordinator, _mux_pair, coordinator
from tunnel import Frame, FrameType, Stream
from tunnel.link import Link

__all__ = ["coordinator"]  # the fixture, used by name below


def record_writes(link: Link) -> tuple[list[int], Callable[[], None]]:
    """The sizes of the websocket messages `link` writes from now on, and how to stop
    recording."""
    ws = link._ws
    written: list[int] = []
    send = ws.send_message

    def recorded(data: bytes) -> None:
        written.append(len(data))
        send(data)

    def restore() -> None:
        ws.send_message = send  # type: ignore[method-assign]

    ws.send_message = recorded  # type: ignore[method-assign]
    return written, restore


async def test_an_open_on_an_idle_link_leaves_at_once_and_a_burst_still_coalesces(
    coordinator: Coordinator,
) -> None:
    client, server_side, _, coord_mux, tasks = await _mux_pair(coordinator)
    await server_side.flush()  # idle: nothing queued, no round due
    written, _ = record_writes(server_side)
    first = await coord_mux.open({"tag": "a", "chunks": 1})
    assert len(written) == 1  # written inside open: no loop turn in between
    burst = await asyncio.gather(*(coord_mux.open({"tag": f"b{n}", "chunks": 1})
                                   for n in range(5)))
    assert len(written) == 3  # the burst's first at once, the other four in one round
    for stream in (first, *burst):
        frames = [frame async for frame in stream]
        assert [f.type for f in frames] == [FrameType.DATA, FrameType.END]
    await client.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_a_whole_answer_leaves_inside_send_last(coordinator: Coordinator) -> None:
    """The answering side's DATA and END as one frame (`Stream.send_last`) are written in
    the call, on an idle link: not in a write round after the handler's turn."""
    inside: list[int] = []

    async def answer(stream: Stream, frame: Frame) -> None:
        link = stream._mux.link
        await link.flush()  # idle: nothing queued, no round due
        written, restore = record_writes(link)
        try:
            await stream.send_last(b"whole", {"usage": {"completion_tokens": 1}})
            inside.append(len(written))
        finally:
            restore()

    client, _, _, coord_mux, tasks = await _mux_pair(coordinator, on_stream=answer)
    stream = await coord_mux.open({"tag": "a"})
    frames = [(f.type, f.body) async for f in stream]
    assert frames == [(FrameType.DATA, b"whole"),
                      (FrameType.END, {"usage": {"completion_tokens": 1}})]
    assert inside == [1]  # one message, written before send_last returned
    await client.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
