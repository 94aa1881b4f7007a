"""The Mux over real loopback websockets (ws_harness.py): concurrent streams, control
frames, cancels, parity, forgotten ENDs, rekeys under traffic, protocol errors, write
coalescing."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.tunnel.ws_harness import (
    Coordinator,
    _connected,
    _drain,
    _mux_pair,
    coordinator,
)
from tunnel import (
    ClosedError,
    Frame,
    FrameError,
    FrameType,
    Stream,
)

__all__ = ["coordinator"]  # the fixture, used by name below


async def test_several_concurrent_streams_each_get_their_own_frames(
    coordinator: Coordinator,
) -> None:
    client, _, _, coord_mux, tasks = await _mux_pair(coordinator)

    async def request(tag: str, chunks: int) -> list[bytes]:
        stream = await coord_mux.open({"tag": tag, "chunks": chunks})
        assert stream.id % 2 == 0
        got = [frame async for frame in stream]
        assert got[-1].type == FrameType.END
        assert got[-1].body == {"n": chunks}
        return [f.body for f in got[:-1]]

    results = await asyncio.wait_for(
        asyncio.gather(*(request(f"r{n}", 5 + n) for n in range(8))), 10
    )
    for n, chunks in enumerate(results):
        assert chunks == [f"r{n}-{i}".encode() for i in range(5 + n)]
    assert coord_mux.open_streams == 0
    await client.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_control_frames_reach_on_control_in_order(coordinator: Coordinator) -> None:
    seen: list[int] = []
    done = asyncio.Event()

    async def on_control(frame: Frame) -> None:
        seen.append(frame.body["n"])
        if len(seen) == 20:
            done.set()

    client, _, node_mux, _, tasks = await _mux_pair(coordinator, on_control=on_control)
    for n in range(20):
        await node_mux.send_control(FrameType.TELEMETRY, {"n": n})
    await asyncio.wait_for(done.wait(), 5)
    assert seen == list(range(20))
    await client.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_link_close_makes_stream_recv_raise_closed_error(
    coordinator: Coordinator,
) -> None:
    started = asyncio.Event()

    async def hang(stream: Stream, frame: Frame) -> None:
        await stream.send(FrameType.DATA, b"first")
        started.set()
        await asyncio.sleep(3600)

    client, _, _, coord_mux, tasks = await _mux_pair(coordinator, on_stream=hang)
    stream = await coord_mux.open({})
    assert (await asyncio.wait_for(stream.recv(), 5)).body == b"first"
    await asyncio.wait_for(started.wait(), 5)
    await client.close()
    with pytest.raises(ClosedError):
        await asyncio.wait_for(stream.recv(), 5)
    with pytest.raises(ClosedError):
        await stream.send(FrameType.CANCEL, None)
    assert stream.closed
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_cancel_reaches_the_node_and_ends_the_stream(coordinator: Coordinator) -> None:
    cancelled = asyncio.Event()

    async def until_cancel(stream: Stream, frame: Frame) -> None:
        await stream.send(FrameType.DATA, b"tok")
        with contextlib.suppress(ClosedError):
            while (await stream.recv()).type != FrameType.CANCEL:
                pass
        cancelled.set()

    client, _, _, coord_mux, tasks = await _mux_pair(coordinator, on_stream=until_cancel)
    stream = await coord_mux.open({})
    await asyncio.wait_for(stream.recv(), 5)
    await stream.send(FrameType.CANCEL, None)
    await asyncio.wait_for(cancelled.wait(), 5)
    assert stream.closed
    assert coord_mux.open_streams == 0
    await client.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_a_stream_opened_with_the_wrong_parity_is_refused(coordinator: Coordinator) -> None:
    client, _, node_mux, coord_mux, tasks = await _mux_pair(coordinator)
    coord_mux.on_stream = None
    stream = await node_mux.open({"x": 1})
    frame = await asyncio.wait_for(stream.recv(), 5)
    assert frame.type == FrameType.ERROR
    await client.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_a_handler_that_forgets_end_sends_an_error(coordinator: Coordinator) -> None:
    async def forgetful(stream: Stream, frame: Frame) -> None:
        await stream.send(FrameType.DATA, b"x")

    client, _, _, coord_mux, tasks = await _mux_pair(coordinator, on_stream=forgetful)
    stream = await coord_mux.open({})
    frames = [f async for f in stream]
    assert [f.type for f in frames] == [FrameType.DATA, FrameType.ERROR]
    await client.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_link_rekeys_after_a_message_count_and_keeps_working(
    coordinator: Coordinator,
) -> None:
    _, client, server_side = await _connected(coordinator)
    client.rekey_after_messages = 3
    first_key = client._session._send._key
    for n in range(10):
        await client.send(Frame(FrameType.TELEMETRY, 0, 0, 0, {"n": n}))
    got = [(await asyncio.wait_for(server_side.recv(), 5)).body["n"] for _ in range(10)]
    assert got == list(range(10))  # KEY_UPDATE frames are absorbed by recv
    assert client._session._send._key != first_key
    assert client._session.sent_since_rekey < 3
    await client.close()


async def test_link_rekeys_after_an_age(coordinator: Coordinator) -> None:
    _, client, server_side = await _connected(coordinator)
    client.rekey_after_s = 0.0
    first_key = client._session._send._key
    await client.send(Frame(FrameType.TELEMETRY, 0, 0, 0, {"n": 1}))
    assert (await asyncio.wait_for(server_side.recv(), 5)).body == {"n": 1}
    # the frame and a KEY_UPDATE left under the old key (one message); the key changed
    assert client._session._send._key != first_key
    assert client._session.sent_since_rekey == 0
    await client.send(Frame(FrameType.TELEMETRY, 0, 0, 0, {"n": 2}))
    assert (await asyncio.wait_for(server_side.recv(), 5)).body == {"n": 2}
    await client.close()


async def test_garbage_on_the_wire_closes_the_link_with_a_protocol_error(
    coordinator: Coordinator,
) -> None:
    _, client, server_side = await _connected(coordinator)
    await client._ws.send(b"\x00" * 40)  # not a valid Noise transport message
    with pytest.raises(FrameError):
        await asyncio.wait_for(server_side.recv(), 5)
    with pytest.raises(ClosedError):
        await server_side.recv()
    await asyncio.wait_for(client._ws.wait_closed(), 5)
    assert client._ws.close_code == 1002


async def test_text_message_closes_the_link(coordinator: Coordinator) -> None:
    _, client, server_side = await _connected(coordinator)
    await client._ws.send("hello")
    with pytest.raises(FrameError, match="text"):
        await asyncio.wait_for(server_side.recv(), 5)


async def test_mux_run_raises_when_the_peer_breaks_the_protocol(
    coordinator: Coordinator,
) -> None:
    client, _, _, coord_mux, tasks = await _mux_pair(coordinator)
    stream = await coord_mux.open({"tag": "t", "chunks": 1000})
    await client._ws.send(b"\x01" * 64)
    with pytest.raises(FrameError):
        await asyncio.wait_for(tasks[1], 5)
    with pytest.raises(ClosedError):
        await asyncio.wait_for(_drain(stream), 5)
    await asyncio.wait_for(tasks[0], 5)


async def test_frames_queued_together_leave_in_one_message_and_an_idle_link_adds_no_wait(
    coordinator: Coordinator,
) -> None:
    _, client, server_side = await _connected(coordinator)
    session = client._session
    # idle: one frame goes out on its own, nothing waits for company
    before = session.sent_since_rekey
    await client.send(Frame(FrameType.TELEMETRY, 0, 0, 0, {"n": -1}))
    await client.flush()
    assert session.sent_since_rekey == before + 1
    assert (await asyncio.wait_for(server_side.recv(), 5)).body == {"n": -1}
    # 100 frames queued in one go (as 100 token streams would): a message or two
    before = session.sent_since_rekey
    await asyncio.gather(
        *(client.send(Frame(FrameType.TELEMETRY, 0, 0, 0, {"n": n})) for n in range(100))
    )
    await client.flush()
    assert session.sent_since_rekey - before <= 2
    got = [(await asyncio.wait_for(server_side.recv(), 5)).body["n"] for _ in range(100)]
    assert got == list(range(100))
    await client.close()
