"""The transport session: frames in, Noise transport messages out, and back.

Each message is one Noise transport message (<= 65,535 bytes with its tag)
whose plaintext is one header byte and a chunk of the frame's payload:

    bit 0  the payload is zstd-compressed (same on every chunk of a frame)
    bit 1  more chunks of this frame follow
    others must be zero

The session stamps every frame it seals with the next seq of its stream in
this direction (the seq the caller put in the Frame is ignored), and checks
the peer's: see `StreamSeqs` (tunnel/seqs.py). Any failure on the receiving side (decrypt,
header, size, decompression, decode, sequence) kills the session: that call
and every later `open` or `seal` raise FrameError.

Coalescing: `prepare` stamps and encodes a frame now; `encrypt` turns a run of prepared
frames into messages, packing small plain ones into one message (header bit 2, each
frame prefixed by its 2-byte big-endian length). Per-type caps (`caps`, by frame type)
bound each frame's decoded payload, checked before decompressing more than 64 KiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tunnel import compress as zstd
from tunnel import frames
from tunnel.constants import (
    BATCH_LEN,
    COMPRESS_MIN,
    COMPRESS_MIN_BY_TYPE,
    FRAME_CAPS,
    HDR_BATCH,
    HDR_COMPRESSED,
    HDR_KNOWN,
    HDR_MORE,
    MAX_FRAME,
    MAX_ID,
    MAX_MESSAGE,
    TAG_LEN,
)
from tunnel.errors import FrameError, TunnelError
from tunnel.frames import Frame, FrameType, kind_of, over
from tunnel.noise import CipherState
from tunnel.seqs import RECV, SEND, STREAM_TYPES, StreamSeqs

# what `StreamSeqs.problem` and `advance` must see even on stream 0, in order
_STREAM_OR_REKEY = STREAM_TYPES | {FrameType.KEY_UPDATE}
# frames the connection itself handles (never `open_lone`'s fused case, raw body or not)
_CONNECTION_TYPES = frozenset(int(t) for t in (
    *_STREAM_OR_REKEY, FrameType.WINDOW, FrameType.PING, FrameType.PONG, FrameType.GOAWAY))

_HEADER_PLAIN = bytes([0])
_HEADER_COMPRESSED = bytes([HDR_COMPRESSED])
_HEADER_BATCH = bytes([HDR_BATCH])
_FIXARRAY_5 = 0x95  # msgpack: a 5-element array, how every frame starts
Prepared = tuple[bytes, bool]  # a frame's payload, and whether it is zstd-compressed


class Session:
    def __init__(
        self,
        send: CipherState,
        recv: CipherState,
        *,
        max_message: int = MAX_MESSAGE,
        max_frame: int = MAX_FRAME,
        caps: Mapping[int, int] | None = None,
    ) -> None:
        if not TAG_LEN + 2 <= max_message <= MAX_MESSAGE:
            raise ValueError(f"max_message must be in {TAG_LEN + 2}..{MAX_MESSAGE}")
        self._send = send
        self._recv = recv
        self.max_message = max_message
        self.max_frame = max_frame
        # decoded payload caps by frame type, for what arrives and for what we send
        self.caps: dict[int, int] = dict(FRAME_CAPS if caps is None else caps)
        self._streams = StreamSeqs()
        self._chunks: list[bytes] = []
        self._chunks_len = 0
        self._chunks_compressed: bool | None = None
        self._zstd = zstd.Decompressor()  # this session's context, reused frame by frame
        self._zstd_out = zstd.Compressor()  # the same for sending
        #: frame types received with their body left as msgpack bytes (`frames.decode_raw`):
        #: the application decodes them itself, typed, in one pass
        self.raw_bodies: frozenset[int] = frozenset()
        self.dead: str | None = None
        self.sent_since_rekey = 0

    def cap(self, kind: int) -> int:
        return min(self.caps.get(kind, self.max_frame), self.max_frame)

    # -- sending --------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise FrameError(f"session is over: {self.dead}")

    def seal(self, frame: Frame) -> list[bytes]:
        """Stamp `frame` with its seq, encode, maybe compress, fragment and encrypt it."""
        return self.encrypt([self.prepare(frame)])

    def prepare(self, frame: Frame) -> Prepared:
        """Stamp `frame` with its seq and encode it (maybe compressed): the stream
        bookkeeping advances now; `encrypt` must then send these in the same order."""
        self._check_alive()
        seq = self._streams.next_seq(frame.stream_id, SEND)
        stamped = Frame(frame.type, frame.stream_id, seq, frame.flags, frame.body)
        problem = self._streams.problem(stamped, SEND)
        if problem is not None:
            raise TunnelError(f"cannot send: {problem}")
        payload = frames.encode(stamped)
        cap = self.max_frame if frame.type == FrameType.DATA else self.cap(frame.type)
        if len(payload) > cap:
            raise TunnelError(
                f"{frame.type.name} frame of {len(payload)} bytes is over its {cap}-byte cap"
            )
        prepared = self._compressed(payload, COMPRESS_MIN_BY_TYPE.get(frame.type, COMPRESS_MIN))
        self._streams.advance(stamped, SEND)
        return prepared

    def prepare_stream(self, kind: FrameType, stream_id: int, flags: int, body: Any) -> Prepared:
        """`prepare` for a request's OPEN or end (`StreamSeqs.straight`), no Frame restamped,
        same checks; any other frame, or one that breaks a rule, goes through `prepare`."""
        seq = self._streams.straight(kind, stream_id, SEND) if self.dead is None else None
        if seq is None or stream_id > MAX_ID or seq > MAX_ID:
            return self.prepare(Frame(kind, stream_id, 0, flags, body))
        payload = frames.encode_parts(kind, stream_id, seq, flags, body)
        cap = self.cap(kind)
        if len(payload) > cap:
            raise TunnelError(over(kind, len(payload), cap))
        prepared = self._compressed(payload, COMPRESS_MIN)
        self._streams.went(kind, stream_id, SEND)
        return prepared

    def _compressed(self, payload: bytes, floor: int) -> Prepared:
        """`payload` zstd-compressed if it is `floor` bytes or more and that is smaller."""
        if len(payload) >= floor:
            packed = self._zstd_out.compress(payload)
            if len(packed) < len(payload):
                return packed, True
        return payload, False

    def prepare_data(self, stream_id: int, body: bytes) -> Prepared:
        """`prepare` for DATA on an open stream, the hot path (same rules)."""
        seqs = self._streams.next.get(stream_id) if stream_id else None
        if seqs is None or self.dead is not None:
            return self.prepare(Frame(FrameType.DATA, stream_id, 0, 0, body))
        payload = frames.encode_data(stream_id, seqs[SEND], body)
        if len(payload) > self.max_frame:
            raise TunnelError(f"DATA frame of {len(payload)} bytes is over the cap")
        prepared = self._compressed(payload, COMPRESS_MIN)
        seqs[SEND] += 1
        return prepared

    def encrypt(self, prepared: list[Prepared]) -> list[bytes]:
        """Messages for these prepared frames, in order: runs of small plain frames share
        one message; a compressed or large frame goes alone (fragmented if needed)."""
        self._check_alive()
        step = self.max_message - TAG_LEN - 1
        messages: list[bytes] = []
        batch: list[bytes] = []
        batch_len = 0
        for payload, compressed in prepared:
            size = len(payload) + BATCH_LEN
            if not compressed and size <= step:
                if batch_len + size > step:
                    messages.append(self._seal_batch(batch))
                    batch, batch_len = [], 0
                batch.append(payload)
                batch_len += size
                continue
            if batch:
                messages.append(self._seal_batch(batch))
                batch, batch_len = [], 0
            messages.extend(self._encrypt_chunks(payload, compressed))
        if batch:
            messages.append(self._seal_batch(batch))
        return messages

    def _seal_batch(self, batch: list[bytes]) -> bytes:
        self.sent_since_rekey += 1
        if len(batch) == 1:
            return self._send.encrypt_with_ad(b"", _HEADER_PLAIN + batch[0])
        parts = [_HEADER_BATCH]
        for payload in batch:
            parts.append(len(payload).to_bytes(BATCH_LEN, "big"))
            parts.append(payload)
        return self._send.encrypt_with_ad(b"", b"".join(parts))

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

    def key_update(self) -> Prepared:
        """A prepared KEY_UPDATE; after encrypting it (last), call `rekey_send`."""
        return self.prepare(Frame(FrameType.KEY_UPDATE, 0, 0, 0, None))

    def rekey_send(self) -> None:
        self._send.rekey()
        self.sent_since_rekey = 0

    def send_key_update(self) -> list[bytes]:
        """Seal a KEY_UPDATE frame under the current key, then rekey the send cipher."""
        messages = self.encrypt([self.key_update()])
        self.rekey_send()
        return messages

    # -- receiving ------------------------------------------------------------

    def open(self, message: bytes) -> Frame | None:
        """The frame this message completes, or None while a fragmented frame is
        incomplete. (A message carrying several frames: use `open_all`.)"""
        got = self.open_all(message)
        if len(got) > 1:
            raise TunnelError("this message carries several frames: use open_all")
        return got[0] if got else None

    def open_all(self, message: bytes) -> list[Frame]:
        """The frames this message completes, in order (none while a fragment is pending)."""
        return [frame for frame, _ in self.open_sized(message)]

    def open_sized(self, message: bytes) -> list[tuple[Frame, int]]:
        """As `open_all`, each frame with the size of its decoded payload."""
        self._check_alive()
        try:
            return self._open(message)
        except FrameError as exc:
            self.dead = str(exc)
            raise

    def open_lone(self, message: bytes) -> tuple[Frame, int] | list[tuple[Frame, int]]:
        """`open_sized` with one case fused (what a coordinator gets most: 1 Hz telemetry
        from every node): a message that is one whole plain frame of a `raw_bodies` type
        for the application (not one the connection handles itself), on the control
        stream and next in order, comes back as that (frame, size), with no list; any
        other message as `open_sized` returns it. Same checks, same errors."""
        if self.dead is not None:
            raise FrameError(f"session is over: {self.dead}")
        try:
            if len(message) > self.max_message:
                raise FrameError("message longer than the maximum")
            plaintext = self._recv.decrypt_with_ad(b"", message)
            if (  # header 0 (plain, whole), no fragment pending, a frame's start, a raw type
                len(plaintext) > 2
                and plaintext[0] == 0
                and plaintext[1] == _FIXARRAY_5
                and plaintext[2] in self.raw_bodies
                and self._chunks_compressed is None
                and plaintext[2] not in _CONNECTION_TYPES
            ):
                payload = plaintext[1:]
                size = len(payload)
                if size <= self.max_frame and size <= self.caps.get(plaintext[2], self.max_frame):
                    frame = frames.decode_raw(payload, self.max_frame)
                    if frame.stream_id == 0:
                        seqs = self._streams.next[0]
                        if frame.seq == seqs[RECV]:
                            seqs[RECV] += 1
                            return frame, size
                    return [self._checked(frame, size)]
            return self._open_plain(plaintext)
        except FrameError as exc:
            self.dead = str(exc)
            raise

    def _open(self, message: bytes) -> list[tuple[Frame, int]]:
        if len(message) > self.max_message:
            raise FrameError("message longer than the maximum")
        return self._open_plain(self._recv.decrypt_with_ad(b"", message))

    def _open_plain(self, plaintext: bytes) -> list[tuple[Frame, int]]:
        if not plaintext or plaintext[0] & ~(HDR_KNOWN | HDR_BATCH):
            raise FrameError("bad chunk header")
        header = plaintext[0]
        if header & HDR_BATCH:
            if header != HDR_BATCH or self._chunks_compressed is not None:
                raise FrameError("bad chunk header")
            return self._open_batch(plaintext)
        compressed = bool(header & HDR_COMPRESSED)
        if not header & HDR_MORE and self._chunks_compressed is None:
            payload = plaintext[1:]  # the usual message: one whole frame, no fragments
            if len(payload) > self.max_frame:
                raise FrameError(f"frame over the {self.max_frame}-byte cap")
        else:
            whole = self._fragment(header, compressed, plaintext)
            if whole is None:
                return []
            payload = whole
        if compressed:
            payload, kind = self._decompress(payload)
        else:
            kind = kind_of(payload)
            if len(payload) > self.cap(kind):
                raise FrameError(over(kind, len(payload), self.cap(kind)))
        return [self._accept(payload)]

    def _fragment(self, header: int, compressed: bool, plaintext: bytes) -> bytes | None:
        """One chunk of a fragmented frame: the whole payload with the last, else None."""
        if self._chunks_compressed not in (None, compressed):
            raise FrameError("compression bit changed inside a fragmented frame")
        self._chunks_compressed = compressed
        self._chunks.append(plaintext[1:])
        self._chunks_len += len(plaintext) - 1
        if self._chunks_len > self.max_frame:
            raise FrameError(f"frame over the {self.max_frame}-byte cap")
        if header & HDR_MORE:
            return None
        payload = b"".join(self._chunks)
        self._chunks, self._chunks_len, self._chunks_compressed = [], 0, None
        return payload

    def _decompress(self, payload: bytes) -> tuple[bytes, int]:
        """A compressed frame's payload and type, its declared size checked against the
        caps before more than a plain message's worth is decoded."""
        declared = zstd.declared_size(payload)
        if declared > self.max_frame:  # refused before decoding a byte
            raise FrameError(
                f"zstd frame declares {declared} bytes, over the {self.max_frame}-byte cap"
            )
        if declared <= MAX_MESSAGE:  # no more work than a plain message: decode, then check
            payload = self._zstd.decompress(payload, declared)
            kind = kind_of(payload)
            if declared > self.cap(kind):
                raise FrameError(over(kind, declared, self.cap(kind)))
            return payload, kind
        kind = kind_of(self._zstd.head(payload, 2))  # its type first (one block decoded)
        if declared > self.cap(kind):
            raise FrameError(over(kind, declared, self.cap(kind)))
        return self._zstd.decompress(payload, self.cap(kind)), kind

    def _open_batch(self, plaintext: bytes) -> list[tuple[Frame, int]]:
        got: list[tuple[Frame, int]] = []
        pos, end = 1, len(plaintext)
        if pos == end:
            raise FrameError("empty batch")
        while pos < end:
            if pos + BATCH_LEN > end:
                raise FrameError("batch entry is truncated")
            size = plaintext[pos] << 8 | plaintext[pos + 1]  # BATCH_LEN bytes, big-endian
            pos += BATCH_LEN
            if size == 0 or pos + size > end:
                raise FrameError("batch entry is empty or truncated")
            payload = plaintext[pos : pos + size]
            pos += size
            kind = kind_of(payload)
            if size > self.cap(kind):
                raise FrameError(over(kind, size, self.cap(kind)))
            got.append(self._accept(payload))
        return got

    def _accept(self, payload: bytes) -> tuple[Frame, int]:
        if self.raw_bodies and kind_of(payload) in self.raw_bodies:
            frame = frames.decode_raw(payload, self.max_frame)
        else:
            frame = frames.decode(payload, self.max_frame)
        kind = frame.type
        if kind is FrameType.DATA:  # the hot path: the next DATA of an open stream
            seqs = self._streams.next.get(frame.stream_id) if frame.stream_id else None
            if seqs is not None and frame.seq == seqs[RECV]:
                seqs[RECV] += 1
                return frame, len(payload)
        elif frame.stream_id == 0 and kind not in _STREAM_OR_REKEY:
            # the other hot path (telemetry): the next control frame, in order
            seqs = self._streams.next[0]
            if frame.seq == seqs[RECV]:
                seqs[RECV] += 1
                return frame, len(payload)
        if self._streams.straight(kind, frame.stream_id, RECV) == frame.seq:
            self._streams.went(kind, frame.stream_id, RECV)  # a request's OPEN or end
            return frame, len(payload)
        return self._checked(frame, len(payload))

    def _checked(self, frame: Frame, size: int) -> tuple[Frame, int]:
        """A decoded frame off the hot paths: its stream and seq checked in full."""
        if self._streams.is_late(frame):
            return frame, size
        problem = self._streams.problem(frame, RECV)
        if problem is not None:
            raise FrameError(problem)
        self._streams.advance(frame, RECV)
        if frame.type == FrameType.KEY_UPDATE:
            self._recv.rekey()
        return frame, size

