"""Frame encoding: every field validated, FrameError and nothing else."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from tunnel.constants import MAX_ID
from tunnel.errors import FrameError
from tunnel.frames import Frame, FrameType, decode, decode_general, encode

GOOD = [
    Frame(FrameType.OPEN, 1, 0, 0, {"model": "m"}),
    Frame(FrameType.DATA, 1, 1, 0, b"\x00chunk"),
    Frame(FrameType.END, 1, 2, 0, {"usage": None}),
    Frame(FrameType.ERROR, 2, 0, 0, {"status": 503}),
    Frame(FrameType.CANCEL, 2, 1, 0, None),
    Frame(FrameType.WINDOW, 1, 3, 0, {"credit": 65536}),
    Frame(FrameType.PING, 0, 0, 0, {"t": 123}),
    Frame(FrameType.PONG, 0, 1, 0, {"t": 123}),
    Frame(FrameType.GOAWAY, 0, 2, 0, {"reason": "bye"}),
    Frame(FrameType.KEY_UPDATE, 0, 3, 0, None),
    Frame(FrameType.TELEMETRY, 0, 4, 0, {"gpus": []}),
    Frame(FrameType.INVENTORY, 0, 5, 0, {"models": ["a"]}),
    Frame(FrameType.COMMAND, 0, 6, 0, {"load": "a"}),
    Frame(FrameType.RESULT, 0, MAX_ID, MAX_ID, {"ok": True}),
]


@pytest.mark.parametrize("frame", GOOD, ids=lambda f: f.type.name)
def test_every_frame_type_round_trips(frame: Frame) -> None:
    assert decode(encode(frame)) == frame


def _raw(*fields: Any) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb({"type": 1}),
        _raw(1, 1, 0, 0),
        _raw(1, 1, 0, 0, {}, "extra"),
        _raw(99, 1, 0, 0, {}),
        _raw(True, 1, 0, 0, {}),
        _raw("1", 1, 0, 0, {}),
        _raw(1, -1, 0, 0, {}),
        _raw(1, MAX_ID + 1, 0, 0, {}),
        _raw(1, 1, 1.5, 0, {}),
        _raw(1, 1, 0, None, {}),
        _raw(2, 1, 0, 0, "text, not bytes"),
        _raw(1, 1, 0, 0, {1: "int key"}),
        _raw(1, 1, 0, 0, {b"k": "bytes key"}),
        _raw(1, 1, 0, 0, b"bytes, not a map"),
        _raw(5, 1, 0, 0, {}),
        _raw(10, 0, 0, 0, b""),
        _raw(6, 1, 0, 0, {"credit": 0}),
        _raw(6, 1, 0, 0, {"credit": True}),
        _raw(7, 0, 0, 0, {}),
        _raw(8, 0, 0, 0, {"t": "now"}),
        msgpack.packb([1, 1, 0, 0, msgpack.ExtType(5, b"x")]),
        b"\x95\x01\x01\x00\x00\xd6\xff\x00\x00\x00\x00",  # a timestamp (ext -1)
        # sizes claimed past what the frame holds: refused, nothing allocated for them
        b"\x95\x01\x01\x00\x00\xdf\x7f\xff\xff\xff",  # a map of 2**31-1 entries
        b"\x95\x01\x01\x00\x00\x81\xa1k\xdd\x7f\xff\xff\xff",  # an array of 2**31-1
        b"\x95\x02\x01\x00\x00\xc6\x7f\xff\xff\xff",  # a bin of 2**31-1 bytes
        b"\x95\x01\x01\x00\x00\x81\xa1k\xdb\x7f\xff\xff\xff",  # a str of 2**31-1 bytes
        b"\x95\x01\x01\x00\x00\xa2\xff\xfe",  # invalid utf-8 string
        b"\x91" * 100_000,  # deep nesting
        _raw(1, 1, 0, 0, {}) + b"\x00",  # trailing byte
    ],
)
def test_malformed_frames_raise_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        decode(data)


def test_declared_lengths_never_allocate_past_the_cap() -> None:
    # a bin header claiming 1 GiB, followed by nothing
    with pytest.raises(FrameError):
        decode(b"\x95\x02\x01\x00\x00\xc6\x40\x00\x00\x00", max_size=1024)
    with pytest.raises(FrameError):
        decode(b"x" * 2048, max_size=1024)


def test_encode_refuses_invalid_frames() -> None:
    with pytest.raises(FrameError):
        encode(Frame(FrameType.DATA, 1, 0, 0, {"not": "bytes"}))
    with pytest.raises(FrameError):
        encode(Frame(FrameType.OPEN, -1, 0, 0, {}))
    with pytest.raises(FrameError):
        encode(Frame(7, 0, 0, 0, {"t": 1}))  # type: ignore[arg-type]
    with pytest.raises(FrameError):
        encode(Frame(FrameType.OPEN, 1, 0, 0, {"x": object()}))


def test_decode_raw_checks_the_envelope_and_leaves_the_body_as_msgpack() -> None:
    from tunnel.frames import decode_raw

    body = {"ts": 1.5, "runtime": {"m": {"in_flight": 2}}}
    frame = decode_raw(msgpack.packb([11, 0, 7, 0, body]))
    assert (frame.type, frame.stream_id, frame.seq, frame.flags) == (FrameType.TELEMETRY, 0, 7, 0)
    assert frame.body == msgpack.packb(body)
    for bad, why in [
        (msgpack.packb([11, 0, 7, 0]), "5-element"),
        (msgpack.packb([11, 0, 7, 0, {}, 1]), "5-element"),
        (msgpack.packb([99, 0, 7, 0, {}]), "unknown frame type"),
        (msgpack.packb([11, 0, 1 << 31, 0, {}]), "seq must be an int"),
        (msgpack.packb([11, True, 7, 0, {}]), "5-element"),
        (bytes([0x95, 11, 0, 1, 0]) + b"\x91" * 100_000 + b"\xc0", "5-element"),  # too deep
        (bytes([0x95, 11, 0, 1, 0, 0xC1]), "5-element"),  # not msgpack
    ]:
        with pytest.raises(FrameError, match=why):
            decode_raw(bad)


def test_a_session_hands_the_raw_types_on_undecoded_and_the_others_decoded() -> None:
    from tunnel_helpers import join

    node, coord, _, _ = join()
    coord.raw_bodies = frozenset({int(FrameType.TELEMETRY)})
    body = {"cpu": 3}
    messages = node.seal(Frame(FrameType.TELEMETRY, 0, 0, 0, body))
    messages += node.seal(Frame(FrameType.INVENTORY, 0, 0, 0, body))
    got = [coord.open(m) for m in messages]
    assert [f.body for f in got if f is not None] == [msgpack.packb(body), body]


def _array16(items: list[object]) -> bytes:
    """msgpack of `items` as an array16 (a non-canonical but valid 5-element array)."""
    return b"\xdc" + len(items).to_bytes(2, "big") + b"".join(
        msgpack.packb(item, use_bin_type=True) for item in items)


@pytest.mark.parametrize("payload", [
    msgpack.packb([2, 1, 0, 0, b"tok"], use_bin_type=True),  # the fast path
    msgpack.packb([2, 2**31 - 1, 2**31 - 1, 0, b""], use_bin_type=True),
    msgpack.packb([2, 2**31, 0, 0, b"x"], use_bin_type=True),  # id out of range
    msgpack.packb([2, -1, 0, 0, b"x"], use_bin_type=True),
    msgpack.packb([2, True, 0, 0, b"x"], use_bin_type=True),  # a bool id
    msgpack.packb([2, 1.0, 0, 0, b"x"], use_bin_type=True),  # a float id
    msgpack.packb([2, 1, 0, 1, b"x"], use_bin_type=True),  # flags
    msgpack.packb([2, 1, 0, 0, "text"], use_bin_type=True),  # a str body
    msgpack.packb([2, 1, 0, 0, b"x"], use_bin_type=True) + b"\x00",  # trailing bytes
    msgpack.packb([2, 1, 0, 0, b"x", 5], use_bin_type=True),  # six items
    msgpack.packb([2, 1, 0, 0], use_bin_type=True),
    _array16([2, 1, 0, 0, b"x"]),  # array16: the general path takes it
    _array16([3, 2, 0, 0, {"k": 1}]),  # array16 whose second byte is 2... not DATA
    b"\x95\x02\x01\x00\x00",  # truncated
])
def test_decodes_fast_path_agrees_with_the_general_decode(payload: bytes) -> None:
    def outcome(fn: Any) -> Any:
        try:
            return fn(payload)
        except FrameError as exc:
            return f"FrameError: {exc}"

    assert outcome(decode) == outcome(decode_general)
