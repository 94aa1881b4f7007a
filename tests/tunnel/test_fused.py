"""A whole answer as one frame (tunnel/fused.py): END carrying the stream's last DATA.

In memory, two cores joined (as test_connection.py): the fused frame reads as the DATA
and END it stands for, takes the same credit, is refused past it, and is only sent to
a peer whose OPEN said it reads it; over a real link (`Stream.send_last`) the reader
sees DATA then END either way.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest
from mux_pair import mux_pair
from test_connection import frames, pair, pump

from tunnel.connection import Connection, Opened, Received
from tunnel.constants import FLAG_DATA, FLAG_FUSE, INITIAL_STREAM_WINDOW
from tunnel.errors import FrameError
from tunnel.frames import Frame, FrameType, decode, encode
from tunnel.fused import FUSED_MAX
from tunnel.stream import Stream

END_BODY = {"usage": {"prompt_tokens": 3, "completion_tokens": 5}, "energy_j": 0.5}


def opened(coord: Connection, node: Connection) -> int:
    sid = coord.open_stream({"model": "m"})
    (event,) = pump(coord, node)
    assert isinstance(event, Opened)
    assert event.frame.flags == FLAG_FUSE
    return sid


def test_a_fused_answer_reads_as_data_then_end_in_one_frame() -> None:
    node, coord = pair()
    sid = opened(coord, node)
    state = node.streams[sid]
    assert state.peer_fuses
    assert node.send_last(state, b'{"answer": 1}', END_BODY)
    assert state.send_credit == INITIAL_STREAM_WINDOW - 13
    assert len(node._out) == 1  # one frame
    (message,) = node.data_to_send(0.0)
    got = frames(coord.receive(message, 0.0))
    assert [(f.type, f.stream_id, f.flags, f.body) for f in got] == [
        (FrameType.DATA, sid, 0, b'{"answer": 1}'),
        (FrameType.END, sid, 0, END_BODY),
    ]
    assert coord.streams == {}
    assert node.streams == {}


def test_the_fused_data_takes_credit_and_reading_it_grants_it_back() -> None:
    node, coord = pair()
    sid = opened(coord, node)
    coord_state = coord.streams[sid]
    data = bytes(FUSED_MAX)
    assert node.send_last(node.streams[sid], data, {})
    pump(node, coord)
    assert coord_state.buffered == len(data) == coord_state.recv_total
    coord.consumed(coord_state, len(data))
    assert coord.ungranted == len(data)  # below half the connection window: held


def test_no_fused_answer_to_a_peer_that_did_not_ask_or_past_the_credit() -> None:
    node, coord = pair()
    coord.send_raw(Frame(FrameType.OPEN, 100, 0, 0, {}))  # an older coordinator's OPEN
    pump(coord, node)
    assert not node.send_last(node.streams[100], b"x", {})
    sid = opened(coord, node)
    state = node.streams[sid]
    assert not node.send_last(state, bytes(FUSED_MAX + 1), {})  # over the fused size
    state.send_credit = 1
    assert not node.send_last(state, b"xy", {})  # past the stream's credit
    assert node.data_to_send(0.0) == []  # nothing was queued
    assert not state.sent_end


def test_fused_data_past_the_streams_credit_kills_the_connection() -> None:
    node, coord = pair()
    sid = opened(coord, node)
    rest = 1000
    node.send_raw(Frame(FrameType.DATA, sid, 0, 0, bytes(INITIAL_STREAM_WINDOW - rest)))
    pump(node, coord)
    node.send_raw(Frame(FrameType.END, sid, 0, FLAG_DATA, {"data": bytes(rest + 1)}))
    with pytest.raises(FrameError, match="past its credit"):
        pump(node, coord)
    assert coord.dead is not None


def test_an_end_flagged_with_data_but_none_is_refused() -> None:
    for body in ({}, {"data": "text"}, {"data": None}):
        with pytest.raises(FrameError, match="END with data needs bytes data"):
            decode(msgpack.packb([int(FrameType.END), 2, 0, FLAG_DATA, body]))
        with pytest.raises(FrameError, match="END with data needs bytes data"):
            encode(Frame(FrameType.END, 2, 0, FLAG_DATA, body))
    node, coord = pair()
    sid = opened(coord, node)
    payload = msgpack.packb([int(FrameType.END), sid, 0, FLAG_DATA, {"data": 7}])
    message = node.session._send.encrypt_with_ad(b"", b"\x00" + payload)
    with pytest.raises(FrameError, match="END with data needs bytes data"):
        coord.receive(message, 0.0)


def test_a_fused_answer_on_a_stream_this_side_ended_gives_its_credit_back() -> None:
    node, coord = pair()
    sid = opened(coord, node)
    assert node.send_last(node.streams[sid], bytes(500), {})
    coord.send(coord.streams[sid], FrameType.CANCEL, None)  # crossed in flight
    events = pump(node, coord)
    assert [e for e in events if isinstance(e, Received)] == []
    assert coord.recv_total == 500
    assert coord.ungranted == 500


async def _answer(fuse: bool, data: bytes, fused: list[bool]) -> list[tuple[FrameType, Any]]:
    async def serve(stream: Stream, frame: Frame) -> None:
        await stream.send_last(data, dict(END_BODY))

    pair = await mux_pair(node_on_stream=serve)
    try:
        send_last = pair.node_mux.conn.send_last

        def noted(*args: Any) -> bool:
            fused.append(send_last(*args))
            return fused[-1]

        pair.node_mux.conn.send_last = noted  # type: ignore[method-assign]
        coord = pair.coord_mux
        if not fuse:  # an opener that does not read fused answers (an older one)
            coord.conn._queue_stream = _without_fuse(coord.conn._queue_stream)  # type: ignore[method-assign]
        stream = await coord.open({"q": 1})
        return [(frame.type, frame.body) async for frame in stream]
    finally:
        await pair.close()


def _without_fuse(queue: Any) -> Any:
    def unflagged(kind: FrameType, stream_id: int, flags: int, body: Any) -> None:
        queue(kind, stream_id, 0 if kind == FrameType.OPEN else flags, body)

    return unflagged


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("size", [0, 300, 64 * 1024])
def test_send_last_over_a_link_reads_data_then_end_either_way(fuse: bool, size: int) -> None:
    data = bytes(range(256)) * (size // 256)
    fused: list[bool] = []
    got = asyncio.run(_answer(fuse, data, fused))
    assert got == [(FrameType.DATA, data), (FrameType.END, END_BODY)]
    assert fused == [fuse and size <= FUSED_MAX]
