"""The websocket reader's twin check: `wire.WsConnection` with its fast path
(`tunnel/wsframes.py`) and with websockets' parser alone (`fast_frames = False`) read the
same byte stream, cut into the same reads, and must agree on everything: the messages
handed on (and after which read), what they write back (pongs, close frames, EOF), the
close code and its wording, the protocol's state and the parser's error.

Used by `scripts/fuzz_tunnel.py` (target `wsframes`, frames grown from the fuzzer's
bytes) and `tests/tunnel/test_wsframes.py` (hypothesis). `frame` builds any frame, valid
or not: every opcode, reserved bits, wrong masking, non-minimal and oversize lengths.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from tunnel.wire import WsConnection
from tunnel.wsframes import apply_mask

MAX_SIZE = 300  # small, so frames over the limit are cheap to build
_loop: asyncio.AbstractEventLoop | None = None


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.written.append(b"<EOF>")

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
          masked: bool = True, length_form: int = 0, length: int | None = None) -> bytes:
    """One frame's bytes as a peer could send them. `length_form`: 0 the shortest
    encoding, 1 always 16 bits, 2 always 64 bits; `length`: a declared length other
    than the payload's (a truncated or overlong frame)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv & 0x70) | (opcode & 0x0F)
    mask_bit = 0x80 if masked else 0
    if length_form == 0 and n < 126:
        head = bytes((first, mask_bit | n))
    elif length_form < 2 and n < 65536:
        head = bytes((first, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, mask_bit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + apply_mask(payload, key)


def _frames_written(written: list[bytes], server: bool) -> list[Any]:
    """What one side wrote, unmasked: (opcode, fin, payload) per frame, and "<EOF>"."""
    out: list[Any] = []
    reader = (ClientProtocol(parse_uri("ws://x/"), max_size=None, state=State.OPEN) if server
              else ServerProtocol(max_size=None, state=State.OPEN))
    for data in written:
        if data == b"<EOF>":
            out.append("<EOF>")
            continue
        reader.receive_data(data)
        out.extend((f.opcode.value, f.fin, bytes(f.data)) for f in reader.events_received())
    return out


def _read(stream: bytes, cuts: list[int], *, server: bool, eof: bool, fast: bool
          ) -> dict[str, Any]:
    protocol = (ServerProtocol(max_size=MAX_SIZE, state=State.OPEN) if server
                else ClientProtocol(parse_uri("ws://x/"), max_size=MAX_SIZE, state=State.OPEN))
    ws = WsConnection(protocol)
    ws.fast_frames = fast
    transport = _Transport()
    ws.connection_made(transport)
    got: list[Any] = []

    def on_message(message: bytes | str) -> bool:
        got.append(message)
        return False

    ws.attach(on_message, lambda why: got.append(("closed", why)), lambda: None)
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(stream)}), len(stream)]
    for start, end in itertools.pairwise(bounds):
        if transport.closing:  # a closed transport reads nothing more
            break
        ws.data_received(stream[start:end])
        got.append(end)  # what each read handed on, not only in the end
    if eof and not transport.closing:
        ws.eof_received()
    ws.connection_lost(None)
    return {
        "messages": got,
        "written": _frames_written(transport.written, server),
        "closing": transport.closing,
        "state": protocol.state,
        "close_code": ws.close_code,
        "close": ws.close_reason_text(),
        "parser_exc": repr(protocol.parser_exc),
    }


async def _both(stream: bytes, cuts: list[int], server: bool, eof: bool
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    return (_read(stream, cuts, server=server, eof=eof, fast=True),
            _read(stream, cuts, server=server, eof=eof, fast=False))


def check(stream: bytes, cuts: list[int], *, server: bool = True, eof: bool = True
          ) -> dict[str, Any]:
    """Read `stream` both ways (AssertionError naming the difference); the fast way's
    result. Runs on a loop of its own (call it where no loop runs)."""
    global _loop  # noqa: PLW0603  (one loop for every check, made once)
    if _loop is None:
        _loop = asyncio.new_event_loop()
    fast, reference = _loop.run_until_complete(_both(stream, cuts, server, eof))
    for key in reference:
        assert fast[key] == reference[key], (
            f"{key}: fast path {fast[key]!r} != websockets {reference[key]!r}")
    return fast


OPCODES = (2, 2, 2, 2, 2, 2, 1, 0, 8, 9, 10, 3, 7, 11, 15)


def grown(data: bytes) -> tuple[bytes, list[int], bool, bool]:
    """A stream of frames grown from fuzzer bytes (mostly valid binary frames, then any
    other kind), its cut points, the side and whether EOF follows."""
    if len(data) < 2:
        return data, [], True, True
    flags, data = data[0], data[1:]
    server, eof = not flags & 1, not flags & 2
    parts: list[bytes] = []
    while data:
        tag, data = data[0], data[1:]
        if tag == 0xFF:  # raw bytes, as they come
            parts.append(data[:8])
            data = data[8:]
            continue
        opcode = OPCODES[tag % len(OPCODES)]
        size = data[0] if data else 0
        data = data[1:]
        if tag & 0x80 and size > 200:
            size *= 2  # sometimes over MAX_SIZE
        payload = data[:size].ljust(size, b"\0")
        data = data[size:]
        if opcode == 8 and size >= 2 and tag & 0x40:
            payload = (1000 + tag % 20).to_bytes(2, "big") + payload[2:]  # a close code
        odd = tag % 32  # 1 in 32 each: a wrong mask, a reserved bit, a cut length
        parts.append(frame(
            opcode, payload, fin=not (tag & 0x10 and tag & 0x20),
            rsv=(0x10 << (tag >> 6) % 3) if odd == 30 else 0, masked=server != (odd == 29),
            length_form=(tag >> 2) % 3 if tag & 0x08 else 0,
            length=size + 3 if odd == 28 else None))
    stream = b"".join(parts)
    cuts = [(flags * 37 + i * 53) % (len(stream) + 1) for i in range(flags >> 5)]
    return stream, cuts, server, eof


__all__ = ["MAX_SIZE", "check", "frame", "grown"]
