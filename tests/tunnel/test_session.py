"""The transport session, node and coordinator joined in memory."""

from __future__ import annotations

import os

import pytest
from tunnel_helpers import deliver, frame, join

from tunnel.constants import MAX_MESSAGE
from tunnel.errors import FrameError, TunnelError
from tunnel.frames import Frame, FrameType
from tunnel.noise import CipherState
from tunnel.seqs import RECENT_ENDED, RECV
from tunnel.session import Session


def test_a_request_stream_flows_both_ways_with_seqs_stamped() -> None:
    node, coord, _, _ = join()
    opened = deliver(coord, node, FrameType.OPEN, 2, {"model": "m"})
    assert (opened.stream_id, opened.seq) == (2, 0)
    assert deliver(node, coord, FrameType.DATA, 2, b"tok").seq == 0
    assert deliver(node, coord, FrameType.DATA, 2, b"tok").seq == 1
    assert deliver(node, coord, FrameType.END, 2, {"usage": None}).seq == 2
    assert deliver(node, coord, FrameType.TELEMETRY, 0, {"cpu": 1}).seq == 0
    assert deliver(node, coord, FrameType.TELEMETRY, 0, {"cpu": 2}).seq == 1


def test_a_flipped_byte_ends_the_session() -> None:
    node, coord, _, _ = join()
    (message,) = node.seal(frame(FrameType.TELEMETRY, 0, {"a": 1}))
    tampered = bytes([message[0] ^ 0x80]) + message[1:]
    with pytest.raises(FrameError):
        coord.open(tampered)
    with pytest.raises(FrameError, match="session is over"):
        coord.open(message)  # even the genuine message: the session is dead
    with pytest.raises(FrameError):
        coord.seal(frame(FrameType.PING, 0, {"t": 1}))


def test_a_replayed_message_ends_the_session() -> None:
    node, coord, _, _ = join()
    (message,) = node.seal(frame(FrameType.PING, 0, {"t": 1}))
    assert coord.open(message) is not None
    with pytest.raises(FrameError):
        coord.open(message)


def test_reordered_messages_end_the_session() -> None:
    node, coord, _, _ = join()
    (first,) = node.seal(frame(FrameType.PING, 0, {"t": 1}))
    (second,) = node.seal(frame(FrameType.PING, 0, {"t": 2}))
    with pytest.raises(FrameError):
        coord.open(second)
    assert first


def test_a_truncated_message_ends_the_session() -> None:
    node, coord, _, _ = join()
    (message,) = node.seal(frame(FrameType.PING, 0, {"t": 1}))
    with pytest.raises(FrameError):
        coord.open(message[:-1])


def test_a_truncated_stream_is_detectable_because_end_never_came() -> None:
    node, coord, _, _ = join()
    deliver(coord, node, FrameType.OPEN, 2, {})
    got = [deliver(node, coord, FrameType.DATA, 2, b"x") for _ in range(3)]
    # The connection drops here: the receiver saw DATA but no END or ERROR.
    assert all(f.type == FrameType.DATA for f in got)
    assert coord._streams.next[2] == [1, 3]
    assert coord._streams.live == 1


def test_large_frames_are_compressed_and_fragmented() -> None:
    node, coord, _, _ = join()
    deliver(coord, node, FrameType.OPEN, 2, {})
    text = {"text": "the same words again " * 20_000}
    messages = node.seal(Frame(FrameType.RESULT, 0, 0, 0, text))
    assert len(messages) == 1  # compressible: one message
    assert coord.open(messages[0]) == Frame(FrameType.RESULT, 0, 0, 0, text)
    noise = os.urandom(200_000)
    messages = node.seal(Frame(FrameType.DATA, 2, 0, 0, noise))
    assert len(messages) == 4
    assert all(len(m) <= MAX_MESSAGE for m in messages)
    assert [coord.open(m) for m in messages[:-1]] == [None, None, None]
    assert coord.open(messages[-1]) == Frame(FrameType.DATA, 2, 0, 0, noise)


def test_small_or_incompressible_payloads_are_sent_plain() -> None:
    node, coord, _, _ = join()
    deliver(coord, node, FrameType.OPEN, 2, {})
    for body in (b"tok", os.urandom(2000)):
        (message,) = node.seal(Frame(FrameType.DATA, 2, 0, 0, body))
        plaintext = coord._recv.decrypt_with_ad(b"", message)
        coord._recv.n -= 1
        assert plaintext[0] == 0
        assert coord.open(message) is not None


def test_reassembly_over_the_cap_ends_the_session() -> None:
    node, coord, _, _ = join()
    small = Session(coord._send, coord._recv, max_frame=100_000)
    deliver(small, node, FrameType.OPEN, 2, {})
    messages = node.seal(Frame(FrameType.DATA, 2, 0, 0, os.urandom(200_000)))
    assert small.open(messages[0]) is None
    with pytest.raises(FrameError, match="cap"):
        small.open(messages[1])


def test_sender_refuses_a_frame_over_the_cap_without_dying() -> None:
    node, coord, _, _ = join()
    small = Session(node._send, node._recv, max_frame=1000)
    deliver(coord, small, FrameType.OPEN, 2, {})
    with pytest.raises(TunnelError, match="cap"):
        small.seal(Frame(FrameType.DATA, 2, 0, 0, os.urandom(5000)))
    assert small.dead is None


def _inject(sender: Session, header: int, payload: bytes) -> bytes:
    return sender._send.encrypt_with_ad(b"", bytes([header]) + payload)


@pytest.mark.parametrize(
    ("header", "payload"),
    [(0x04, b""), (0x00, b"\xc1"), (0x01, b"not zstd")],
)
def test_bad_header_bits_or_payload_end_the_session(header: int, payload: bytes) -> None:
    node, coord, _, _ = join()
    with pytest.raises(FrameError):
        coord.open(_inject(node, header, payload))
    assert coord.dead


def test_empty_plaintext_and_flipping_compression_mid_frame_end_the_session() -> None:
    node, coord, _, _ = join()
    with pytest.raises(FrameError):
        coord.open(node._send.encrypt_with_ad(b"", b""))
    node, coord, _, _ = join()
    assert coord.open(_inject(node, 0x03, b"part")) is None
    with pytest.raises(FrameError, match="compression bit"):
        coord.open(_inject(node, 0x00, b"rest"))


def test_oversized_message_ends_the_session() -> None:
    _, coord, _, _ = join()
    with pytest.raises(FrameError):
        coord.open(bytes(MAX_MESSAGE + 1))


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([Frame(FrameType.DATA, 3, 0, 0, b"x")], "never opened"),
        ([Frame(FrameType.OPEN, 3, 1, 0, {})], "expected 0"),
        ([Frame(FrameType.OPEN, 3, 0, 0, {}), Frame(FrameType.DATA, 3, 2, 0, b"")], "expected 1"),
        ([Frame(FrameType.OPEN, 3, 0, 0, {}), Frame(FrameType.OPEN, 3, 1, 0, {})], "in use"),
        (
            [
                Frame(FrameType.OPEN, 3, 0, 0, {}),
                Frame(FrameType.END, 3, 1, 0, {}),
                Frame(FrameType.OPEN, 3, 0, 0, {}),
            ],
            "after it ended",
        ),
        ([Frame(FrameType.PING, 0, 1, 0, {"t": 1})], "expected 0"),
        ([Frame(FrameType.OPEN, 0, 0, 0, {})], "not allowed"),
        ([Frame(FrameType.TELEMETRY, 3, 0, 0, {})], "not allowed"),
    ],
)
def test_sequence_violations_end_the_session(frames: list[Frame], reason: str) -> None:
    """Frames forged by a peer holding the keys (seq written by hand, not by seal)."""
    from tunnel.frames import encode

    node, coord, _, _ = join()
    for f in frames[:-1]:
        coord.open(_inject(node, 0, encode(f)))
    with pytest.raises(FrameError, match=reason):
        coord.open(_inject(node, 0, encode(frames[-1])))


def test_peer_cannot_open_a_stream_already_in_use() -> None:
    from tunnel.frames import encode

    node, coord, _, _ = join()
    deliver(coord, node, FrameType.OPEN, 2, {})
    with pytest.raises(FrameError, match="already in use"):
        coord.open(_inject(node, 0, encode(Frame(FrameType.OPEN, 2, 0, 0, {}))))


def test_local_sequence_mistakes_are_refused_without_killing_the_session() -> None:
    node, coord, _, _ = join()
    with pytest.raises(TunnelError, match="never opened"):
        node.seal(frame(FrameType.DATA, 5, b"x"))
    deliver(coord, node, FrameType.OPEN, 2, {})
    deliver(node, coord, FrameType.END, 2, {})
    with pytest.raises(TunnelError, match="after it ended"):
        node.seal(frame(FrameType.DATA, 2, b"x"))
    assert node.dead is None
    assert deliver(node, coord, FrameType.PING, 0, {"t": 1}).type == FrameType.PING


def test_a_stream_is_forgotten_as_soon_as_either_side_ends_it() -> None:
    node, coord, _, _ = join()
    deliver(coord, node, FrameType.OPEN, 2, {})
    deliver(node, coord, FrameType.END, 2, {})
    deliver(coord, node, FrameType.OPEN, 4, {})
    deliver(coord, node, FrameType.CANCEL, 4)
    for side in (node, coord):
        assert side._streams.live == 0


def test_frames_that_crossed_the_end_in_flight_are_let_by() -> None:
    node, coord, _, _ = join()
    deliver(coord, node, FrameType.OPEN, 2, {})
    in_flight = node.seal(frame(FrameType.DATA, 2, b"late"))
    in_flight += node.seal(frame(FrameType.END, 2, {}))
    deliver(coord, node, FrameType.CANCEL, 2)  # crosses the node's DATA and END
    opened = [coord.open(m) for m in in_flight]
    assert [f.type for f in opened if f] == [FrameType.DATA, FrameType.END]
    assert coord.dead is None


def test_ended_stream_ids_are_remembered_for_a_bounded_while() -> None:
    node, _, _, _ = join()
    for sid in range(2, 2 + 2 * (RECENT_ENDED + 5), 2):
        node._streams.advance(Frame(FrameType.OPEN, sid, 0, 0, {}), RECV)
        node._streams.advance(Frame(FrameType.CANCEL, sid, 1, 0, None), RECV)
    assert len(node._streams.ended) == RECENT_ENDED
    assert node._streams.live == 0


def test_rekey_keeps_streams_working() -> None:
    node, coord, _, _ = join()
    deliver(coord, node, FrameType.OPEN, 2, {})
    deliver(node, coord, FrameType.DATA, 2, b"before")
    old_key = node._send._key
    for message in node.send_key_update():
        assert coord.open(message) == Frame(FrameType.KEY_UPDATE, 0, 0, 0, None)
    assert node._send._key != old_key
    assert node.sent_since_rekey == 0
    after = deliver(node, coord, FrameType.DATA, 2, b"after")
    assert (after.body, after.seq) == (b"after", 1)
    for message in coord.send_key_update():
        node.open(message)
    assert deliver(coord, node, FrameType.CANCEL, 2).seq == 1


def test_a_receiver_that_missed_the_key_update_cannot_read_on() -> None:
    node, coord, _, _ = join()
    node.send_key_update()  # lost
    (message,) = node.seal(frame(FrameType.PING, 0, {"t": 1}))
    with pytest.raises(FrameError):
        coord.open(message)


def test_failed_decrypt_does_not_advance_the_receive_nonce() -> None:
    node, coord, _, _ = join()
    (message,) = node.seal(frame(FrameType.PING, 0, {"t": 1}))
    with pytest.raises(FrameError):
        coord.open(message[:-1] + bytes([message[-1] ^ 1]))
    assert coord._recv.n == 0


def test_session_refuses_silly_message_sizes() -> None:
    with pytest.raises(ValueError, match="max_message"):
        Session(CipherState(bytes(32)), CipherState(bytes(32)), max_message=MAX_MESSAGE + 1)
