"""The transport session: frames in, Noise transport messages out, and back.

Each message is one Noise transport message (<= 65,535 bytes with its tag)
whose plaintext is one header byte and a chunk of the frame's payload:

    bit 0  the payload is zstd-compressed (same on every chunk of a frame)
    bit 1  more chunks of this frame follow
    others must be zero

The session stamps every frame it seals with the next seq of its stream in
this direction (the seq the caller put in the Frame is ignored), and checks
the peer's: see `_Streams`. Any failure on the receiving side (decrypt,
header, size, decompression, decode, sequence) kills the session: that call
and every later `open` or `seal` raise FrameError.
"""

from __future__ import annotations

from collections import OrderedDict

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


SEND, RECV = 0, 1
_HEADER_PLAIN = bytes([0])
_HEADER_COMPRESSED = bytes([HDR_COMPRESSED])
RECENT_ENDED = 8192  # ended stream ids remembered, so frames that crossed the end are let by


class _Streams:
    """Sequence bookkeeping for both directions of one session.

    Rules: on every stream, in each direction, seq counts 0, 1, 2, ... with no
    gap. A stream other than 0 begins with OPEN (seq 0) from the side that
    opens it; the other side may then send on it (from seq 0), never OPEN it
    again. END, ERROR or CANCEL, from either side, ends the stream for both:
    it is forgotten, and nothing more may be sent on it. A frame that arrives
    on a recently ended stream crossed the end in flight: it is let by
    unchecked (the caller drops it), except OPEN, since ids are never reused.
    """

    def __init__(self) -> None:
        self.next: dict[int, list[int]] = {0: [0, 0]}
        self.ended: OrderedDict[int, None] = OrderedDict()

    def next_seq(self, stream_id: int, way: int) -> int:
        seqs = self.next.get(stream_id)
        return seqs[way] if seqs else 0

    def is_late(self, frame: Frame) -> bool:
        return frame.stream_id in self.ended and frame.type != FrameType.OPEN

    def problem(self, frame: Frame, way: int) -> str | None:
        sid, kind = frame.stream_id, frame.type
        if kind not in BOTH and (sid == 0) == (kind in STREAM_TYPES):
            where = "the control stream" if sid == 0 else f"stream {sid}"
            return f"{kind.name} is not allowed on {where}"
        if sid in self.ended:
            return f"{kind.name} on stream {sid} after it ended"
        seqs = self.next.get(sid)
        if seqs is None and kind != FrameType.OPEN:
            return f"{kind.name} on stream {sid}, which was never opened"
        if seqs is not None and kind == FrameType.OPEN:
            return f"OPEN of stream {sid}, which is already in use"
        expected = seqs[way] if seqs else 0
        if frame.seq != expected:
            return f"stream {sid} seq {frame.seq}, expected {expected}"
        return None

    def advance(self, frame: Frame, way: int) -> None:
        sid = frame.stream_id
        if sid != 0 and frame.type in TERMINAL:
            self.next.pop(sid, None)
            self.ended[sid] = None
            if len(self.ended) > RECENT_ENDED:
                self.ended.popitem(last=False)
        else:
            self.next.setdefault(sid, [0, 0])[way] = frame.seq + 1

    @property
    def live(self) -> int:
        """Streams open now (the control stream not counted)."""
        return len(self.next) - 1


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
        self._streams = _Streams()
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
        seq = self._streams.next_seq(frame.stream_id, SEND)
        stamped = Frame(frame.type, frame.stream_id, seq, frame.flags, frame.body)
        problem = self._streams.problem(stamped, SEND)
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
        self._streams.advance(stamped, SEND)
        return messages

    def _encrypt_chunks(self, payload: bytes, compressed: bool) -> list[bytes]:
        step = self.max_message - TAG_LEN - 1
        if len(payload) <= step:  # one message: the usual case
            first = _HEADER_COMPRESSED if compressed else _HEADER_PLAIN
            self.sent_since_rekey += 1
            return [self._send.encrypt_with_ad(b"", first + payload)]
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
        if self._streams.is_late(frame):
            return frame
        problem = self._streams.problem(frame, RECV)
        if problem is not None:
            raise FrameError(problem)
        self._streams.advance(frame, RECV)
        if frame.type == FrameType.KEY_UPDATE:
            self._recv.rekey()
        return frame
