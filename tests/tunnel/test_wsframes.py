"""The fast websocket frame reader (`tunnel/wsframes.py`) reads what websockets' parser
reads, refuses what it refuses and closes as it closes, however a stream is cut into
reads: each case is read twice by `wire.WsConnection`, fast and with websockets alone
(`scripts/ws_twin.py`), and the two must agree on everything."""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from tunnel import wsframes
from tunnel.wsframes import HAND_OFF, KEYS_AT_ONCE, at_frame_start, binary_frame, read_binary

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import ws_twin
from ws_twin import MAX_SIZE, check, frame

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# mostly whole binary messages (the fast path), then every other kind of frame
opcodes = st.sampled_from([2] * 8 + [1, 0, 8, 9, 10, 3, 7, 11, 15])
frames = st.builds(
    lambda opcode, payload, fin, rsv, wrong_mask, form, short: (
        opcode, payload, fin, rsv, wrong_mask, form, short),
    opcodes,
    st.binary(max_size=40) | st.binary(min_size=120, max_size=MAX_SIZE + 40)
    | st.sampled_from([MAX_SIZE - 1, MAX_SIZE, MAX_SIZE + 1, 65536]).map(lambda n: b"s" * n),
    st.booleans() | st.just(True),
    st.sampled_from([0] * 12 + [0x10, 0x20, 0x40]),
    st.sampled_from([False] * 15 + [True]),
    st.sampled_from([0] * 6 + [1, 2]),
    st.sampled_from([False] * 15 + [True]),
)
close_payloads = st.sampled_from([
    b"", b"\x03", b"\x03\xe8", b"\x03\xe8bye", b"\x03\xe9", b"\x03\xed", b"\x0b\xb8ok",
    b"\x03\xe8\xff\xfe", b"\x13\x88", b"\x03\xe8" + b"r" * 130,
])


def _handed(got: dict[str, Any]) -> list[Any]:
    """The messages handed on, without the twin's read markers."""
    return [m for m in got["messages"] if isinstance(m, bytes | str)]


def _stream(specs: list[tuple[int, bytes, bool, int, bool, int, bool]], closes: list[bytes],
            server: bool) -> tuple[bytes, list[int]]:
    """The frames' bytes, and the places worth cutting at: every frame's start, the end
    of its header and of its first two header bytes (where a reader may hold a header
    and wait for the payload with nothing buffered)."""
    out: list[bytes] = []
    marks: list[int] = []
    at = 0
    for index, (opcode, given_payload, fin, rsv, wrong_mask, form, short) in enumerate(specs):
        payload = closes[index % len(closes)] if opcode == 8 and closes else given_payload
        data = frame(opcode, payload, fin=fin, rsv=rsv, masked=server != wrong_mask,
                     length_form=form, length=len(payload) + 5 if short else None)
        head = len(data) - len(payload)
        marks += [at, at + 2, at + head - 4, at + head, at + head + 1]
        out.append(data)
        at += len(data)
    return b"".join(out), marks


@FAST
@given(st.lists(frames, max_size=8), st.lists(close_payloads, max_size=2),
       st.lists(st.floats(0, 1), max_size=4), st.lists(st.integers(0, 40), max_size=6),
       st.booleans(), st.booleans())
def test_any_stream_cut_anywhere_is_read_as_websockets_reads_it(
    specs: list[tuple[int, bytes, bool, int, bool, int, bool]], closes: list[bytes],
    anywhere: list[float], at_marks: list[int], server: bool, eof: bool,
) -> None:
    stream, marks = _stream(specs, closes, server)
    cuts = [round(c * len(stream)) for c in anywhere]
    cuts += [marks[i % len(marks)] for i in at_marks if marks]
    check(stream, cuts, server=server, eof=eof)


@FAST
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=4), st.booleans())
def test_any_bytes_after_good_frames_are_read_as_websockets_reads_them(
    tail: bytes, cuts: list[int], server: bool
) -> None:
    head = b"".join(frame(2, bytes([n]) * n, masked=server) for n in range(4))
    check(head + tail, cuts, server=server)


def test_every_frame_of_a_stream_read_byte_by_byte() -> None:
    stream = b"".join(frame(2, bytes([n]) * (n * 37 % 290)) for n in range(20))
    got = check(stream, list(range(len(stream))), eof=False)
    assert _handed(got) == [bytes([n]) * (n * 37 % 290) for n in range(20)]


def test_a_frame_over_the_limit_is_refused_from_its_header_with_1009() -> None:
    header_only = frame(2, b"", length=MAX_SIZE + 1)  # its payload never arrives
    got = check(frame(2, b"ok") + header_only, [], eof=False)
    assert _handed(got)[0] == b"ok"
    assert "sent 1009 (message too big)" in got["close"]
    assert got["written"][0][0] == 8  # websockets' close frame (then EOF: server side)


def test_control_frames_mid_stream_are_answered_and_the_fast_path_resumes() -> None:
    stream = frame(2, b"a") + frame(9, b"hi") + frame(2, b"b") + frame(10, b"") + frame(2, b"c")
    got = check(stream, [3, 9, 10])
    assert _handed(got)[:3] == [b"a", b"b", b"c"]
    assert got["written"][0] == (10, True, b"hi")  # the pong


def test_the_fast_path_waits_while_websockets_holds_a_frame_header() -> None:
    """Found by the fuzzer: websockets had read a pong's header (its buffer then empty,
    its payload awaited) when the next read looked like a binary frame's start."""
    stream = bytes.fromhex("8a7e0003") + bytes.fromhex("8200")  # (client side: unmasked)
    got = check(stream, [1, 2, 4, 5], server=False)
    assert not [m for m in _handed(got) if isinstance(m, bytes)]


def test_a_frame_over_the_limit_is_refused_before_its_mask_key_arrives() -> None:
    header = frame(2, b"", length=MAX_SIZE + 1)[:4]  # 16-bit length, no key yet
    got = check(header, [], eof=False)
    assert "sent 1009" in got["close"]


def test_a_fragmented_message_then_whole_ones() -> None:
    stream = (frame(2, b"ab", fin=False) + frame(9, b"p") + frame(0, b"cd")
              + frame(2, b"e"))
    got = check(stream, [1, 5, 12])
    assert _handed(got)[:2] == [b"abcd", b"e"]


def test_unmasked_client_frames_reserved_bits_and_bad_opcodes_close_with_1002() -> None:
    for bad in (frame(2, b"x", masked=False), frame(2, b"x", rsv=0x40), frame(3, b"x")):
        got = check(frame(2, b"ok") + bad + frame(2, b"late"), [2])
        assert _handed(got)[0] == b"ok"
        assert b"late" not in _handed(got)
        assert "sent 1002 (protocol error)" in got["close"]


def test_the_close_handshake_with_a_status_code() -> None:
    got = check(frame(2, b"x") + frame(8, b"\x03\xe8bye") + frame(2, b"after"), [])
    assert _handed(got)[0] == b"x"
    assert b"after" not in _handed(got)
    assert got["written"][0] == (8, True, b"\x03\xe8bye")  # echoed
    assert got["close_code"] == 1000


def test_a_frame_cut_short_by_eof_ends_as_websockets_words_it() -> None:
    got = check(frame(2, b"whole") + frame(2, b"cut short")[:6], [])
    assert _handed(got)[0] == b"whole"
    assert got["close_code"] == 1006


def test_the_client_side_reads_unmasked_frames_and_refuses_masked_ones() -> None:
    got = check(frame(2, b"x", masked=False) + frame(2, b"y", masked=True), [], server=False)
    assert _handed(got)[0] == b"x"
    assert "sent 1002 (protocol error) incorrect masking" in got["close"]


def test_read_binary_says_how_much_a_partial_frame_needs() -> None:
    whole = frame(2, b"z" * 200)  # 16-bit length, masked: 8 header bytes
    assert read_binary(whole[:1], True, MAX_SIZE) == ([], 0, 2)
    assert read_binary(whole[:3], True, MAX_SIZE) == ([], 0, 4)  # then its length is known
    assert read_binary(whole[:5], True, MAX_SIZE) == ([], 0, 208)
    assert read_binary(whole, True, MAX_SIZE) == ([b"z" * 200], 208, 0)
    assert read_binary(frame(9, b""), True, MAX_SIZE) == ([], 0, HAND_OFF)
    assert read_binary(frame(2, b"", length=MAX_SIZE + 1), True, MAX_SIZE) == ([], 0, HAND_OFF)


def test_binary_frame_writes_what_websockets_writes() -> None:
    for size in (0, 1, 125, 126, 127, 65535, 65536, 70000):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        server = ServerProtocol(max_size=None, state=State.OPEN)
        server.send_binary(data)
        assert binary_frame(data, mask=False) == b"".join(server.data_to_send())
        client = ClientProtocol(parse_uri("ws://x/"), max_size=None, state=State.OPEN)
        client.send_binary(data)
        reference = b"".join(client.data_to_send())
        ours = binary_frame(data, mask=True)
        assert len(ours) == len(reference)
        assert ours[:len(reference) - size - 4] == reference[:len(reference) - size - 4]
        reader = ServerProtocol(max_size=None, state=State.OPEN)
        reader.receive_data(ours)
        [got] = reader.events_received()
        assert (got.opcode.value, got.fin, bytes(got.data)) == (2, True, data)


def test_the_twin_check_would_see_a_difference() -> None:
    """The harness is not vacuous: a reader that drops a message is caught."""
    original = ws_twin._read

    def lossy(stream: bytes, cuts: list[int], **kw: bool) -> dict[str, object]:
        got = original(stream, cuts, **kw)
        if kw["fast"]:
            got["messages"] = _handed(got)[1:]  # type: ignore[index]
        return got

    ws_twin._read = lossy  # type: ignore[assignment]
    try:
        with pytest.raises(AssertionError, match="messages: fast path"):
            check(frame(2, b"a") + frame(2, b"b"), [])
    finally:
        ws_twin._read = original


def test_websockets_is_seen_waiting_for_a_frame_so_the_fast_path_comes_back() -> None:
    """`at_frame_start` reads websockets' generator chain. If a websockets release built its
    parser otherwise, every read after the first ping would go to websockets for good: still
    right, silently slow. The twin check cannot see that; this can."""
    protocol = ServerProtocol(max_size=MAX_SIZE, state=State.OPEN)
    assert at_frame_start(protocol)
    protocol.receive_data(frame(9, b"ping"))
    assert at_frame_start(protocol)  # a whole control frame read: waiting for the next
    binary = frame(2, b"x" * 200)
    protocol.receive_data(binary[:5])
    assert not at_frame_start(protocol)  # a frame begun: websockets must finish it
    protocol.receive_data(binary[5:])
    assert at_frame_start(protocol)


def test_mask_keys_are_drawn_in_bulk_and_each_used_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client frame's mask key comes from the OS's random source, `KEYS_AT_ONCE` keys per
    call: every frame gets the next key drawn, none twice."""
    drawn: list[int] = []

    def urandom(n: int) -> bytes:  # numbered keys, so that each can be told apart
        first = len(drawn) * KEYS_AT_ONCE
        drawn.append(n)
        return b"".join(k.to_bytes(4, "big") for k in range(first, first + n // 4))

    monkeypatch.setattr(wsframes.os, "urandom", urandom)
    monkeypatch.setattr(wsframes, "_keys", deque())
    keys = [binary_frame(b"x", mask=True)[2:6] for _ in range(2 * KEYS_AT_ONCE + 1)]
    assert [int.from_bytes(k, "big") for k in keys] == list(range(2 * KEYS_AT_ONCE + 1))
    assert drawn == [4 * KEYS_AT_ONCE] * 3
