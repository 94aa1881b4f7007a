"""Frames: what one Noise transport message (or several, fragmented) carries.

Wire form: a msgpack array ``[type, stream_id, seq, flags, body]``. Every
field is checked on decode, and anything wrong raises FrameError and nothing
else. The body's shape depends on the type:

    DATA                   bytes
    WINDOW                 {"credit": int > 0}
    PING, PONG             {"t": int}
    CANCEL, KEY_UPDATE     None
    everything else        a map with str keys
    END with FLAG_DATA     ... whose "data" is bytes (the stream's last DATA, fused)
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import msgpack
import msgspec

from tunnel.constants import FLAG_DATA, MAX_FRAME, MAX_ID
from tunnel.errors import FrameError


class FrameType(IntEnum):
    OPEN = 1
    DATA = 2
    END = 3
    ERROR = 4
    CANCEL = 5
    WINDOW = 6
    PING = 7
    PONG = 8
    GOAWAY = 9
    KEY_UPDATE = 10
    TELEMETRY = 11
    INVENTORY = 12
    COMMAND = 13
    RESULT = 14


TERMINAL = frozenset({FrameType.END, FrameType.ERROR, FrameType.CANCEL})
_NONE_BODY = frozenset({FrameType.CANCEL, FrameType.KEY_UPDATE})
_TIME_BODY = frozenset({FrameType.PING, FrameType.PONG})
_MAP_RULES = frozenset({FrameType.END, FrameType.WINDOW, *_TIME_BODY})  # more than a map


class Frame(msgspec.Struct, frozen=True, gc=False):
    """One frame (immutable). A msgspec Struct, not a frozen dataclass: built in C, ~0.1
    us against ~1.7 for a frozen dataclass's generated `__init__` (`object.__setattr__`
    per field), once per frame each way; not tracked by the cyclic GC (a frame cannot
    be part of a cycle: nothing it holds refers back to it)."""

    type: FrameType
    stream_id: int
    seq: int
    flags: int
    body: Any


def _valid_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_is_str = str.__instancecheck__  # `all(map(...))`: no generator frame a key


def body_error(kind: FrameType, body: Any, flags: int = 0) -> str | None:
    """Why `body` is not a valid body for a frame of type `kind` (with `flags`), or None
    if it is."""
    if kind == FrameType.DATA:
        return None if isinstance(body, bytes) else "DATA body must be bytes"
    if kind in _NONE_BODY:
        return None if body is None else f"{kind.name} body must be nil"
    if not isinstance(body, dict) or not all(map(_is_str, body)):
        return f"{kind.name} body must be a map with str keys"
    return _map_error(kind, body, flags) if kind in _MAP_RULES else None


def _map_error(kind: FrameType, body: dict[str, Any], flags: int) -> str | None:
    """`body_error` for the types whose body is a map (it is one, with str keys)."""
    if kind == FrameType.END and flags & FLAG_DATA and not isinstance(body.get("data"), bytes):
        return "END with data needs bytes data"
    if kind == FrameType.WINDOW:
        credit = body.get("credit")
        ok = isinstance(credit, int) and not isinstance(credit, bool) and credit > 0
        return None if ok else "WINDOW needs an int credit > 0"
    if kind in _TIME_BODY:
        return None if _is_int(body.get("t")) else f"{kind.name} needs an int t"
    return None


def validate(frame: Frame) -> None:
    _validate_head(frame)
    reason = body_error(frame.type, frame.body, frame.flags)
    if reason is not None:
        raise FrameError(reason)


def _validate_head(frame: Frame) -> None:
    """The frame's type and ids (not its body)."""
    if not isinstance(frame.type, FrameType):
        raise FrameError(f"unknown frame type {frame.type!r}")
    for name in ("stream_id", "seq", "flags"):
        if not _valid_id(getattr(frame, name)):
            raise FrameError(f"frame {name} must be an int in 0..{MAX_ID}")


_DATA = FrameType.DATA
_BY_VALUE: dict[int, FrameType] = {int(t): t for t in FrameType}
_ENVELOPE = msgspec.msgpack.Decoder(tuple[int, int, int, int, msgspec.Raw])
#: a DATA frame as `decode`'s fast path reads it: exactly five items, ints (never bools,
#: never floats) and a bin body, nothing after it; anything else to the general decode
_DATA_FRAME = msgspec.msgpack.Decoder(tuple[int, int, int, int, bytes])
_packer = msgpack.Packer(use_bin_type=True)


def encode_data(stream_id: int, seq: int, body: bytes) -> bytes:
    """The hot path: a DATA frame whose ids the session made (no general validation)."""
    return _packer.pack([2, stream_id, seq, 0, body])


def encode(frame: Frame) -> bytes:
    _validate_head(frame)
    return encode_parts(frame.type, frame.stream_id, frame.seq, frame.flags, frame.body)


def encode_parts(kind: FrameType, stream_id: int, seq: int, flags: int, body: Any) -> bytes:
    """`encode` for a frame whose type and ids are known good (the session made them):
    its body is checked (`body_error`) and encoded."""
    reason = body_error(kind, body, flags)
    if reason is not None:
        raise FrameError(reason)
    try:  # the packer starts afresh after a failure (msgpack resets its buffer)
        return _packer.pack([int(kind), stream_id, seq, flags, body])
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError(f"frame body cannot be encoded: {exc}") from None


def decode(data: bytes, max_size: int = MAX_FRAME) -> Frame:
    if len(data) > max_size:
        raise FrameError("frame too large")
    if data[1:2] == b"\x02":  # the hot path, token DATA: typed in one pass (msgspec, in C)
        try:
            kind, stream_id, seq, flags, body = _DATA_FRAME.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass  # not a plain DATA frame: the general decode below says what is wrong
        else:
            if kind == 2 and not flags and 0 <= stream_id <= MAX_ID and 0 <= seq <= MAX_ID:
                return Frame(_DATA, stream_id, seq, 0, body)
    return decode_general(data, max_size)


def decode_general(data: bytes, max_size: int = MAX_FRAME) -> Frame:
    """`decode` without its DATA fast path (msgpack; the fuzzer's reference for it)."""
    if len(data) > max_size:
        raise FrameError("frame too large")
    try:
        # msgpack's own bounds when none is given are the data's length (a string, bin or
        # array can claim no more items or bytes than `data` holds; a map half as many):
        # tighter than `max_size` and 2**20, which `data` is within (checked above); its
        # other defaults are ours (raw=False, strict_map_key, use_list). Spelled out, the
        # five keywords cost ~3 us a frame; ext types stay refused (max_ext_len=0).
        value = msgpack.unpackb(data, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise FrameError("frame is not valid msgpack") from None
    if not isinstance(value, list) or len(value) != 5:
        raise FrameError("frame must be a 5-element array")
    kind, stream_id, seq, flags, body = value
    if (  # the hot path, token DATA: exact types, ids in range
        kind == 2
        and type(body) is bytes
        and type(stream_id) is int
        and type(seq) is int
        and type(flags) is int
        and flags == 0
        and 0 <= stream_id <= MAX_ID
        and 0 <= seq <= MAX_ID
        and type(kind) is int
    ):
        return Frame(_DATA, stream_id, seq, 0, body)
    frame_type = _BY_VALUE.get(kind) if type(kind) is int else None
    if frame_type is None:
        raise FrameError(f"unknown frame type {kind!r}")
    frame = Frame(frame_type, stream_id, seq, flags, body)
    if (  # ids of exact int type in range: only the body is left to check
        type(stream_id) is int
        and type(seq) is int
        and type(flags) is int
        and 0 <= stream_id <= MAX_ID
        and 0 <= seq <= MAX_ID
        and 0 <= flags <= MAX_ID
    ):
        reason = body_error(frame_type, body, flags)
        if reason is not None:
            raise FrameError(reason)
        return frame
    validate(frame)  # says which field is wrong
    return frame


def decode_raw(data: bytes, max_size: int = MAX_FRAME) -> Frame:
    """`decode` for a frame whose body the application decodes itself, typed, in one pass
    (`Session.raw_bodies`): the envelope is checked as `decode` does, the body is left as
    its msgpack bytes (it is well-formed msgpack; its shape is the application's to check)."""
    if len(data) > max_size:
        raise FrameError("frame too large")
    try:
        kind, stream_id, seq, flags, body = _ENVELOPE.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        raise FrameError("frame is not a valid msgpack 5-element array") from None
    frame_type = _BY_VALUE.get(kind)
    if frame_type is None:
        raise FrameError(f"unknown frame type {kind!r}")
    frame = Frame(frame_type, stream_id, seq, flags, bytes(body))
    # msgspec decoded the three as ints (never bools): only their range is left to check
    if not (0 <= stream_id <= MAX_ID and 0 <= seq <= MAX_ID and 0 <= flags <= MAX_ID):
        for name in ("stream_id", "seq", "flags"):
            if not _valid_id(getattr(frame, name)):
                raise FrameError(f"frame {name} must be an int in 0..{MAX_ID}")
    return frame


_FIXARRAY_5 = 0x95  # msgpack: a 5-element array, how every frame starts


def kind_of(head: bytes) -> int:
    """The frame type in a payload's first two bytes (0 if they are not a frame's start:
    the decoder then refuses it)."""
    if len(head) >= 2 and head[0] == _FIXARRAY_5 and head[1] < 0x80:
        return head[1]
    return 0


def over(kind: int, size: int, cap: int) -> str:
    """A frame over its type's cap, in words."""
    name = FrameType(kind).name if kind in FrameType._value2member_map_ else f"type {kind}"
    return f"{name} frame of {size} bytes is over its {cap}-byte cap"
