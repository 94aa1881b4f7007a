"""The websocket frames of the common case, read and written without websockets' parser.

Once a websocket is OPEN nearly every frame either side sees is one whole binary message
(FIN set, opcode 2, no reserved bit, masked from the client and unmasked from the
server, within the size limit). websockets' sans-I/O parser reads each through a chain of
generators and a `Frame` dataclass (4-11 us a frame, `scripts/bench/wsframes.py`);
`read_binary` slices the same frames out of a read in one loop (~1-3 us).

It takes only those frames, and stops at the first other one: a control frame (ping,
pong, close), text, a fragment, a reserved bit, a bad opcode, wrong masking or a length
over the limit. `wire.WsConnection` then hands the rest of the read, from that frame's
first byte, to websockets' parser, which answers, refuses and closes (1002, 1009) as it
always did, and takes the fast path back once websockets holds no partial frame and no
fragmented message. So every refusal and the closing handshake stay websockets' own;
`tests/tunnel/test_wsframes.py` checks the two read the same streams alike.

websockets is handed bytes only from a frame's first byte, and the fast path takes over
again only once its parser waits for a new frame (`at_frame_start`: its reader may have
taken a frame's header and wait for the payload with an empty buffer).

The length is checked against the limit as soon as the header is read, before any of a
frame's payload is held (a frame over it goes to websockets, which closes with 1009).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any

from websockets.protocol import Protocol

try:  # websockets' C helper (shipped in its wheels); its pure-Python one otherwise
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - a websockets built without its C extension
    from websockets.utils import apply_mask as _apply_mask

apply_mask: Callable[[bytes, bytes], bytes] = _apply_mask

BINARY_FIN = 0x82  # FIN, no reserved bit, opcode 2 (binary)
MASK_BIT = 0x80
HAND_OFF = -1  # `read_binary`'s `need` when the frame at `pos` is websockets' to read


def read_binary(  # noqa: PLR0911  (one return per way a read stops)
    buf: bytes, masked: bool, max_size: int
) -> tuple[list[bytes], int, int]:
    """The payloads of the whole single-frame binary messages at the start of `buf`
    (unmasked when `masked`: the server reading a client), where reading stopped, and
    `need`: 0 when all of `buf` was read, HAND_OFF when the frame at `pos` is not one this
    reader takes (websockets must read from there), else how many bytes from `pos` the
    incomplete frame there needs before it can be read (its header, then its whole size;
    never more than `max_size` plus a header)."""
    out: list[bytes] = []
    pos, n = 0, len(buf)
    mask_bit = MASK_BIT if masked else 0
    key = 4 if masked else 0
    while pos < n:
        if n - pos < 2:
            return out, pos, 2
        second = buf[pos + 1]
        if buf[pos] != BINARY_FIN or second & MASK_BIT != mask_bit:
            return out, pos, HAND_OFF
        length = second & 0x7F
        if length < 126:
            start = pos + 2
        elif length == 126:
            if n - pos < 4:
                return out, pos, 4
            length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            start = pos + 4
        else:
            if n - pos < 10:
                return out, pos, 10
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            start = pos + 10
        if length > max_size:  # known before the mask key, as websockets knows it
            return out, pos, HAND_OFF  # websockets refuses it: 1009, message too big
        start += key
        end = start + length
        if end > n:
            return out, pos, end - pos
        if masked:
            out.append(apply_mask(buf[start:end], buf[start - 4 : start]))
        else:
            out.append(buf[start:end])
        pos = end
    return out, pos, 0


def at_frame_start(protocol: Protocol) -> bool:
    """websockets' parser waits for the first byte of a frame (it holds nothing of one):
    the innermost generator it runs is its reader's `at_eof`, which only waits while the
    buffer is empty. Anything else (a frame begun, the HTTP upgrade, a websockets whose
    parser is built otherwise): False, and websockets goes on reading."""
    generator: Any = protocol.parser
    try:
        while generator.gi_yieldfrom is not None:
            generator = generator.gi_yieldfrom
        return bool(generator.gi_code.co_name == "at_eof")
    except AttributeError:  # pragma: no cover - not a generator chain: never fast
        return False


def binary_frame(data: bytes, mask: bool) -> bytes:
    """One whole binary message as a single frame, as websockets writes it (the client
    masks with 4 random bytes, RFC 6455 5.3; the server does not)."""
    length = len(data)
    if length < 126:
        head = bytes((BINARY_FIN, length | (MASK_BIT if mask else 0)))
    elif length < 65536:
        head = bytes((BINARY_FIN, 126 | (MASK_BIT if mask else 0))) + length.to_bytes(2, "big")
    else:
        head = bytes((BINARY_FIN, 127 | (MASK_BIT if mask else 0))) + length.to_bytes(8, "big")
    if not mask:
        return head + data
    key = mask_key()
    return head + key + apply_mask(data, key)


#: Mask keys not used yet: drawn from the OS's random source `KEYS_AT_ONCE` at a time (one
#: getrandom call per that many frames a client writes, not one a frame); each used once.
_keys: deque[bytes] = deque()
KEYS_AT_ONCE = 1024
os.register_at_fork(after_in_child=_keys.clear)  # a child draws its own


def mask_key() -> bytes:
    """A fresh 4-byte masking key (RFC 6455 5.3: new for each frame, unpredictable)."""
    try:
        return _keys.popleft()
    except IndexError:
        drawn = os.urandom(4 * KEYS_AT_ONCE)
        _keys.extend(drawn[at:at + 4] for at in range(4, len(drawn), 4))
        return drawn[:4]


__all__ = ["HAND_OFF", "KEYS_AT_ONCE", "apply_mask", "at_frame_start", "binary_frame", "mask_key",
           "read_binary"]
