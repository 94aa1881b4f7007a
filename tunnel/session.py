"""The transport session: frames in, Noise transport messages out, and back.

Each message is one Noise transport message (<= 65,535 bytes with its tag)
whose plaintext is one header byte and a chunk of the frame's payload:

    bit 0  the payload is zstd-compressed (same on every chunk of a frame)
    bit 1  more chunks of this frame follow
    others must be zero

The session stamps every frame it seals with the next seq of its stream in
this direction (the seq the caller put in the Frame is ignored), and checks
the peer's: see `_Direction`. Any failure on the receiving side (decrypt,
header, size, decompression, decode, sequence) kills the session: that call
and every later `open` or `seal` raise FrameError.
"""

from __future__ import annotations

import dataclasses

from tunnel import compress as zstd
from tunnel import frames
from tunnel.constants import (
    COMPRESS_MIN,
    HDR_COMPRESSED,
    HDR_KNOWN,
    HDR_MORE,
    MAX_FRAME,
    MAX_MESSAGE,
    TAG_LEN,
)
from tunnel.errors import FrameError, TunnelError
from tunnel.frames import TERMINAL, Frame, FrameType
from tunnel.noise import CipherState

STREAM_TYPES = frozenset(
    {FrameType.OPEN, FrameType.DATA, FrameType.END, FrameType.ERROR, FrameType.CANCEL}
)
BOTH = frozenset({FrameType.WINDOW})


class _Direction:
    """Sequence bookkeeping for one direction of one session.

    Rules: on every stream, seq counts 0, 1, 2, ... with no gap. A stream other
    than 0 begins with OPEN (seq 0) in the direction that opens it; the other
    direction may only start (at seq 0, any stream frame but OPEN) once the
    stream is known. After END, ERROR or CANCEL nothing more flows that way;
    once both ways have ended the stream is forgotten.
    """

    def __init__(self) -> None:
        self.next: dict[int, int] = {0: 0}
        self.ended: set[int] = set()

    def knows(self, stream_id: int) -> bool:
        return stream_id in self.next or stream_id in self.ended

    def next_seq(self, stream_id: int) -> int:
        return self.next.get(stream_id, 0)

    def problem(self, frame: Frame, other: _Direction) -> str | None:
        sid, kind = frame.stream_id, frame.type
        if kind not in BOTH and (sid == 0) == (kind in STREAM_TYPES):
            where = "the control stream" if sid == 0 else f"stream {sid}"
            return f"{kind.name} is not allowed on {where}"
        if sid in self.ended:
            return f"{kind.name} on stream {sid} after it ended"
        return self._seq_problem(frame, other)

    def _seq_problem(self, frame: Frame, other: _Direction) -> str | None:
        sid, kind = frame.stream_id, frame.type
        expected = self.next.get(sid)
        if expected is None:
            if kind == FrameType.OPEN and other.knows(sid):
                return f"OPEN of stream {sid}, which is already in use"
            if kind != FrameType.OPEN and not other.knows(sid):
                return f"{kind.name} on stream {sid}, which was never opened"
            expected = 0
        elif kind == FrameType.OPEN:
            return f"second OPEN on stream {sid}"
        if frame.seq != expected:
            return f"stream {sid} seq {frame.seq}, expected {expected}"
        return None

    def advance(self, frame: Frame, other: _Direction) -> None:
        sid = frame.stream_id
        if sid != 0 and frame.type in TERMINAL:
            self.next.pop(sid, None)
            self.ended.add(sid)
            if sid in other.ended:
                self.ended.discard(sid)
                other.ended.discard(sid)
        else:
            self.next[sid] = frame.seq + 1


class Session:
    def __init__(
        self,
        send: CipherState,
        recv: CipherState,
        *,
        max_message: int = MAX_MESSAGE,
        max_frame: int = MAX_FRAME,
    ) -> None:
        if not TAG_LEN + 2 <= max_message <= MAX_MESSAGE:
            raise ValueError(f"max_message must be in {TAG_LEN + 2}..{MAX_MESSAGE}")
        self._send = send
        self._recv = recv
        self.max_message = max_message
        self.max_frame = max_frame
        self._out = _Direction()
        self._in = _Direction()
        self._chunks: list[bytes] = []
        self._chunks_len = 0
        self._chunks_compressed: bool | None = None
        self.dead: str | None = None
        self.sent_since_rekey = 0

    # -- sending --------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise FrameError(f"session is over: {self.dead}")

    def seal(self, frame: Frame) -> list[bytes]:
        """Stamp `frame` with its seq, encode, maybe compress, fragment and encrypt it."""
        self._check_alive()
        stamped = dataclasses.replace(frame, seq=self._out.next_seq(frame.stream_id))
        problem = self._out.problem(stamped, self._in)
        if problem is not None:
            raise TunnelError(f"cannot send: {problem}")
        payload = frames.encode(stamped)
        if len(payload) > self.max_frame:
            raise TunnelError(f"frame of {len(payload)} bytes is over the {self.max_frame} cap")
        compressed = False
        if len(payload) >= COMPRESS_MIN:
            packed = zstd.compress(payload)
            if len(packed) < len(payload):
                payload, compressed = packed, True
        messages = self._encrypt_chunks(payload, compressed)
        self._out.advance(stamped, self._in)
        return messages

    def _encrypt_chunks(self, payload: bytes, compressed: bool) -> list[bytes]:
        step = self.max_message - TAG_LEN - 1
        starts = range(0, max(len(payload), 1), step)
        messages = []
        for index, start in enumerate(starts):
            header = (HDR_COMPRESSED if compressed else 0) | (
                HDR_MORE if index < len(starts) - 1 else 0
            )
            chunk = bytes([header]) + payload[start : start + step]
            messages.append(self._send.encrypt_with_ad(b"", chunk))
        self.sent_since_rekey += len(messages)
        return messages

    def send_key_update(self) -> list[bytes]:
        """Seal a KEY_UPDATE frame under the current key, then rekey the send cipher."""
        messages = self.seal(Frame(FrameType.KEY_UPDATE, 0, 0, 0, None))
        self._send.rekey()
        self.sent_since_rekey = 0
        return messages

    # -- receiving ------------------------------------------------------------

    def open(self, message: bytes) -> Frame | None:
        """The frame this message completes, or None while a fragmented frame is incomplete."""
        self._check_alive()
        try:
            return self._open(message)
        except FrameError as exc:
            self.dead = str(exc)
            raise

    def _open(self, message: bytes) -> Frame | None:
        if len(message) > self.max_message:
            raise FrameError("message longer than the maximum")
        plaintext = self._recv.decrypt_with_ad(b"", message)
        if not plaintext or plaintext[0] & ~HDR_KNOWN:
            raise FrameError("bad chunk header")
        compressed = bool(plaintext[0] & HDR_COMPRESSED)
        if self._chunks_compressed not in (None, compressed):
            raise FrameError("compression bit changed inside a fragmented frame")
        self._chunks_compressed = compressed
        self._chunks.append(plaintext[1:])
        self._chunks_len += len(plaintext) - 1
        if self._chunks_len > self.max_frame:
            raise FrameError(f"frame over the {self.max_frame}-byte cap")
        if plaintext[0] & HDR_MORE:
            return None
        payload = b"".join(self._chunks)
        self._chunks, self._chunks_len, self._chunks_compressed = [], 0, None
        if compressed:
            payload = zstd.decompress(payload, self.max_frame)
        frame = frames.decode(payload, self.max_frame)
        problem = self._in.problem(frame, self._out)
        if problem is not None:
            raise FrameError(problem)
        self._in.advance(frame, self._out)
        if frame.type == FrameType.KEY_UPDATE:
            self._recv.rekey()
        return frame
