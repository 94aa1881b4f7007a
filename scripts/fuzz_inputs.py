"""Inputs grown from the fuzzer's bytes, shared by the targets in scripts/fuzz_targets.py:
msgpack-able values, session plaintexts (some real frames, compressed, batched or
fragmented), and a pair of sessions on shared keys. Imported after atheris has
instrumented the tunnel package, like fuzz_targets.py (never an entry point).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import msgpack
import zstandard

from tunnel.constants import FLAG_DATA, HDR_BATCH, HDR_COMPRESSED, HDR_MORE
from tunnel.frames import FrameType
from tunnel.noise import CipherState
from tunnel.session import Session

__all__ = ["SessionPair", "grown_plaintexts", "grown_value"]


def grown_value(data: bytes, depth: int = 0) -> tuple[Any, bytes]:
    """A msgpack-able value grown from the bytes (a tiny structured generator)."""
    if not data:
        return None, b""
    tag, rest = data[0], data[1:]
    kind = tag % 11
    if kind == 0:
        return None, rest
    if kind == 1:
        return bool(tag & 0x10), rest
    if kind in (2, 3):
        n = int.from_bytes(rest[:8].ljust(8, b"\0"), "little", signed=kind == 3)
        return n >> (tag >> 4) * 4, rest[8:]
    if kind == 4:
        return float(int.from_bytes(rest[:4].ljust(4, b"\0"), "little")) / 7, rest[4:]
    if kind == 5:
        n = tag >> 3
        return rest[:n].decode("utf-8", "replace"), rest[n:]
    if kind == 6:
        n = tag >> 3
        return bytes(rest[:n]), rest[n:]
    if kind in (7, 8) and depth < 4:
        items = []
        for _ in range(tag >> 5):
            item, rest = grown_value(rest, depth + 1)
            items.append(item)
        if kind == 7:
            return items, rest
        out: dict[Any, Any] = {}
        for index in range(0, len(items) - 1, 2):
            key = items[index]
            out[key if isinstance(key, str | int) else str(key)] = items[index + 1]
        return out, rest
    if kind == 9:  # a frame-shaped array around a grown body
        body, rest = grown_value(rest, depth + 1)
        sid = int.from_bytes(rest[:2].ljust(2, b"\0"), "little") - 2
        return [tag >> 4, sid, rest[2:3][0] if rest[2:3] else 0, 0, body], rest[3:]
    return int(tag) - 128, rest


class SessionPair:
    node: Session
    coord: Session
    lone: Session  # the coordinator's twin, read through `open_lone` (must agree with it)

    def __init__(self) -> None:
        self.fresh()

    def fresh(self) -> None:
        """Two sessions on shared transport keys, as a handshake leaves them (the
        handshake itself is the `handshake` target's: no DH per session here)."""
        up, down = os.urandom(32), os.urandom(32)
        self.node = Session(CipherState(up), CipherState(down))
        self.coord = Session(CipherState(down), CipherState(up))
        self.lone = Session(CipherState(down), CipherState(up))


def grown_plaintexts(data: bytes) -> list[bytes]:
    """Split the input into chunk plaintexts; some become real frames, maybe compressed."""
    out = []
    while data:
        head, data = data[0], data[1:]
        n = min(len(data), head * 3)
        chunk, data = data[:n], data[n:]
        mode = head & 0x03
        if mode == 1:  # a valid-shaped frame with a grown body on a grown stream
            value, _ = grown_value(chunk)
            kind = FrameType(1 + head % 14)
            flags = head >> 6 & FLAG_DATA  # an END's fused DATA (other kinds ignore it)
            with contextlib.suppress(TypeError, ValueError, OverflowError):
                chunk = msgpack.packb([int(kind), head >> 4, 0, flags, value], use_bin_type=True)
            out.append(bytes([0]) + chunk)
        elif mode == 2:  # compressed
            out.append(bytes([HDR_COMPRESSED]) + zstandard.ZstdCompressor().compress(chunk))
        elif mode == 3 and head & 0x40:  # a batch of length-prefixed entries
            out.append(bytes([HDR_BATCH]) + len(chunk).to_bytes(2, "big")[head >> 7 :] + chunk)
        elif mode == 3:  # a fragment with more to come
            out.append(bytes([HDR_MORE | (head >> 7)]) + chunk)
        else:
            out.append(chunk)  # raw: the header byte is whatever came
    return out
