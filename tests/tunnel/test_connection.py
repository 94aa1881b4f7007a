"""The sans-I/O connection: two cores joined in memory (no sockets, no clock, no tasks).

Streams, credit, GOAWAY, ping/RTT, rekey, coalescing and the bounds a peer cannot pass,
each driven by handing one side's `data_to_send` to the other's `receive`.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack
import pytest
from tunnel_helpers import join

from tunnel.compress import compress
from tunnel.connection import Connection, Credit, Event, Opened, Pong, Received
from tunnel.constants import (
    FRAME_CAPS,
    HDR_COMPRESSED,
    INITIAL_CONNECTION_WINDOW,
    INITIAL_STREAM_WINDOW,
    MAX_UPWARD_STREAMS,
    MAX_WINDOW,
)
from tunnel.errors import ClosedError, FrameError, TunnelError
from tunnel.frames import Frame, FrameType


def pair(**coord: Any) -> tuple[Connection, Connection]:
    """(node, coordinator): the node is the initiator (odd stream ids)."""
    node_session, coord_session, _, _ = join()
    return (
        Connection(node_session, initiator=True),
        Connection(coord_session, initiator=False, **coord),
    )


def pump(sender: Connection, receiver: Connection, now: float = 0.0) -> list[Event]:
    events: list[Event] = []
    for message in sender.data_to_send(now):
        events += receiver.receive(message, now)
    return events


def frames(events: list[Event]) -> list[Frame]:
    return [e.frame for e in events if isinstance(e, Received | Opened)]


def test_a_stream_opens_carries_data_and_ends_for_both_sides() -> None:
    node, coord = pair()
    sid = coord.open_stream({"model": "m"})
    (opened,) = pump(coord, node)
    assert isinstance(opened, Opened)
    assert (opened.frame.stream_id, opened.frame.body) == (sid, {"model": "m"})
    state = node.streams[sid]
    node.send(state, FrameType.DATA, b"tok")
    node.send(state, FrameType.END, {"usage": {}})
    got = frames(pump(node, coord))
    assert [(f.type, f.seq) for f in got] == [(FrameType.DATA, 0), (FrameType.END, 1)]
    assert sid not in node.streams
    assert sid not in coord.streams
    with pytest.raises(ClosedError, match="ended"):
        node.send(state, FrameType.DATA, b"late")


def test_frames_queued_together_leave_in_one_message_in_order() -> None:
    node, coord = pair()
    sid = coord.open_stream({})
    pump(coord, node)
    state = node.streams[sid]
    for index in range(200):
        node.send(state, FrameType.DATA, b"data: {\"i\": %d}\n\n" % index)
    messages = node.data_to_send(0.0)
    assert len(messages) == 1  # coalesced
    got = frames(coord.receive(messages[0], 0.0))
    assert [f.seq for f in got] == list(range(200))
    assert node.data_to_send(0.0) == []  # nothing left: an idle link sends nothing


def test_a_sender_cannot_pass_its_credit_and_reading_grants_it_back() -> None:
    node, coord = pair()
    sid = coord.open_stream({})
    pump(coord, node)
    state = node.streams[sid]
    assert node.sendable(state) == INITIAL_STREAM_WINDOW
    node.send(state, FrameType.DATA, bytes(INITIAL_STREAM_WINDOW))
    assert node.sendable(state) == 0
    with pytest.raises(TunnelError, match="past the credit"):
        node.send(state, FrameType.DATA, b"x")
    pump(node, coord)
    mine = coord.streams[sid]
    assert mine.buffered == INITIAL_STREAM_WINDOW
    coord.consumed(mine, INITIAL_STREAM_WINDOW // 2 - 1)
    assert coord.data_to_send(0.0) == []  # under half a window read: no WINDOW yet
    coord.consumed(mine, 1)
    credit = pump(coord, node)
    assert credit == [Credit(sid)]
    assert node.sendable(state) == INITIAL_STREAM_WINDOW // 2


def test_data_past_the_stream_credit_kills_the_connection() -> None:
    node, coord = pair()
    sid = coord.open_stream({})
    pump(coord, node)
    for _ in range(2):
        node.send_raw(Frame(FrameType.DATA, sid, 0, 0, bytes(INITIAL_STREAM_WINDOW // 2)))
    pump(node, coord)
    node.send_raw(Frame(FrameType.DATA, sid, 0, 0, b"x"))
    with pytest.raises(FrameError, match="past its credit"):
        pump(node, coord)
    assert coord.dead is not None
    with pytest.raises(FrameError, match="session is over"):
        coord.open_stream({})


def test_data_past_the_connection_credit_kills_the_connection() -> None:
    node, coord = pair(stream_window=8 * INITIAL_CONNECTION_WINDOW)
    sid = coord.open_stream({})
    pump(coord, node)
    node.send_raw(Frame(FrameType.DATA, sid, 0, 0, bytes(INITIAL_CONNECTION_WINDOW + 1)))
    with pytest.raises(FrameError, match="connection's credit"):
        pump(node, coord)


def test_a_window_past_the_maximum_kills_the_connection() -> None:
    node, coord = pair()
    node.send_raw(Frame(FrameType.WINDOW, 0, 0, 0, {"credit": MAX_WINDOW}))
    with pytest.raises(FrameError, match="past"):
        pump(node, coord)


def test_ending_a_stream_gives_its_unread_bytes_connection_credit_back() -> None:
    node, coord = pair()
    sid = coord.open_stream({})
    pump(coord, node)
    state = node.streams[sid]
    node.send(state, FrameType.DATA, bytes(INITIAL_STREAM_WINDOW))
    pump(node, coord)
    coord.send(coord.streams[sid], FrameType.CANCEL, None)
    assert coord.ungranted == INITIAL_STREAM_WINDOW
    assert frames(pump(coord, node))[0].type == FrameType.CANCEL
    assert sid not in node.streams


def test_goaway_refuses_new_streams_both_ways_and_lets_open_ones_finish() -> None:
    node, coord = pair()
    live = coord.open_stream({})
    pump(coord, node)
    crossing = coord.open_stream({})  # still in flight when the node goes away
    assert node.goaway("node draining")
    assert not node.goaway("twice")
    (goaway,) = frames(pump(node, coord))
    assert goaway.type == FrameType.GOAWAY
    assert goaway.body == {"reason": "node draining", "last_stream": live}
    assert coord.peer_going_away == "node draining"
    with pytest.raises(ClosedError, match="node draining"):
        coord.open_stream({})
    with pytest.raises(ClosedError, match="this side is going away"):
        node.open_stream({})
    assert pump(coord, node) == []  # the crossing OPEN is refused, not handed on
    (refusal,) = frames(pump(node, coord))
    assert (refusal.type, refusal.stream_id, refusal.body["status"]) == (
        FrameType.ERROR,
        crossing,
        503,
    )
    node.send(node.streams[live], FrameType.END, {})
    assert frames(pump(node, coord))[0].type == FrameType.END


def test_a_stream_opened_with_the_wrong_parity_is_refused() -> None:
    node, coord = pair()
    node.send_raw(Frame(FrameType.OPEN, 2, 0, 0, {}))  # an even id is the coordinator's
    assert pump(node, coord) == []
    (message,) = coord.data_to_send(0.0)
    (refusal,) = node.session.open_all(message)  # (the node's core knew no such stream)
    assert (refusal.type, refusal.stream_id, refusal.body["status"]) == (FrameType.ERROR, 2, 400)


def test_ping_measures_rtt_from_the_times_passed_in() -> None:
    node, coord = pair()
    stamp = node.ping(10.0)
    assert pump(node, coord, 10.1) == []  # answered inside the core, not an event
    assert pump(coord, node, 10.25) == [Pong(stamp)]
    assert node.rtt_ms == pytest.approx(250.0)


def test_rekey_by_message_count_and_by_age_is_transparent_to_the_peer() -> None:
    node, coord = pair()
    node.rekey_after_messages = 3
    key = node.session._send._key
    for index in range(10):
        node.send_control(FrameType.TELEMETRY, {"n": index})
        got = frames(pump(node, coord))
        assert [f.body["n"] for f in got] == [index]
    assert node.session._send._key != key
    node.rekey_after_messages = 1 << 20
    node.rekey_after_s = 600.0
    key = node.session._send._key
    node.send_control(FrameType.TELEMETRY, {"n": 10})
    pump(node, coord, 599.0)
    assert node.session._send._key == key
    node.send_control(FrameType.TELEMETRY, {"n": 11})
    assert [f.body["n"] for f in frames(pump(node, coord, 601.0))] == [11]
    assert node.session._send._key != key


def _inject(node: Connection, header: int, payload: bytes) -> bytes:
    return node.session._send.encrypt_with_ad(b"", bytes([header]) + payload)


@pytest.mark.parametrize("kind", [FrameType.TELEMETRY, FrameType.INVENTORY, FrameType.OPEN])
def test_a_compressed_frame_declaring_more_than_its_types_cap_is_refused_before_decoding(
    kind: FrameType,
) -> None:
    node, coord = pair()
    body = {"blob": "x" * (FRAME_CAPS[kind] + 1)}
    payload = msgpack.packb([int(kind), 1 if kind == FrameType.OPEN else 0, 0, 0, body])
    with pytest.raises(FrameError, match=rf"{kind.name} frame of .* over its"):
        coord.receive(_inject(node, HDR_COMPRESSED, compress(payload)), 0.0)


def test_an_uncompressed_frame_over_its_types_cap_is_refused() -> None:
    node, coord = pair()
    body = {"blob": os.urandom(FRAME_CAPS[FrameType.TELEMETRY] // 2).hex()}  # 2x the cap
    with pytest.raises(TunnelError, match="over its"):  # the sender refuses it too...
        node.send_control(FrameType.TELEMETRY, body)
    assert node.dead is None
    payload = msgpack.packb([int(FrameType.TELEMETRY), 0, 0, 0, body])
    *first, last = node.session._encrypt_chunks(payload, False)  # ...a hostile one does not
    for message in first:
        assert coord.receive(message, 0.0) == []
    with pytest.raises(FrameError, match=r"TELEMETRY frame of .* over its"):
        coord.receive(last, 0.0)


def test_a_data_frame_larger_than_the_window_is_refused_before_decompressing() -> None:
    node, coord = pair()
    sid = coord.open_stream({})
    pump(coord, node)
    payload = msgpack.packb([int(FrameType.DATA), sid, 0, 0, bytes(INITIAL_STREAM_WINDOW * 2)])
    with pytest.raises(FrameError, match=r"DATA frame of .* over its"):
        coord.receive(_inject(node, HDR_COMPRESSED, compress(payload)), 0.0)


def test_the_peer_cannot_hold_more_than_its_share_of_streams_open() -> None:
    node, coord = pair()
    for _ in range(MAX_UPWARD_STREAMS):
        node.open_stream({})
    assert len(pump(node, coord)) == MAX_UPWARD_STREAMS
    # ending one makes room for one
    coord.send(coord.streams[1], FrameType.END, {})
    pump(coord, node)
    node.open_stream({})
    assert len(pump(node, coord)) == 1
    node.open_stream({})
    with pytest.raises(FrameError, match=f"more than {MAX_UPWARD_STREAMS} streams"):
        pump(node, coord)


def test_open_bodies_held_at_once_are_bounded() -> None:
    node, coord = pair(max_open_bytes=1_000_000)
    body = {"body": os.urandom(300_000)}
    for _ in range(3):
        node.open_stream(body)
    assert len(pump(node, coord)) == 3
    assert 900_000 < coord.open_bytes < 1_000_000
    node.open_stream(body)
    with pytest.raises(FrameError, match="bytes of OPEN"):
        pump(node, coord)


def test_batches_are_checked_entry_by_entry() -> None:
    node, coord = pair()
    with pytest.raises(FrameError, match="empty batch"):
        coord.receive(_inject(node, 0x04, b""), 0.0)
    node, coord = pair()
    with pytest.raises(FrameError, match="truncated"):
        coord.receive(_inject(node, 0x04, b"\x00\x09abc"), 0.0)
    node, coord = pair()
    with pytest.raises(FrameError, match="bad chunk header"):
        coord.receive(_inject(node, 0x05, b"\x00\x01\x00"), 0.0)
