"""The seq rules of one session, both directions (`Session` keeps one `StreamSeqs`)."""

from __future__ import annotations

from collections import OrderedDict

from tunnel.frames import TERMINAL, Frame, FrameType

STREAM_TYPES = frozenset(
    {FrameType.OPEN, FrameType.DATA, FrameType.END, FrameType.ERROR, FrameType.CANCEL}
)
BOTH = frozenset({FrameType.WINDOW})
SEND, RECV = 0, 1
RECENT_ENDED = 8192  # ended stream ids remembered, so frames that crossed the end are let by

__all__ = ["BOTH", "RECENT_ENDED", "RECV", "SEND", "STREAM_TYPES", "StreamSeqs"]


class StreamSeqs:
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

    def straight(self, kind: FrameType, sid: int, way: int) -> int | None:
        """The seq of a request stream's frame that goes straight through the rules, one
        way: OPEN of a fresh id, or END, ERROR, CANCEL on an open stream; None for any
        other (`problem` says what is wrong, if anything). Nothing changes until `went`."""
        if sid == 0 or sid in self.ended:
            return None
        seqs = self.next.get(sid)
        if kind is FrameType.OPEN:
            return 0 if seqs is None else None
        return seqs[way] if seqs is not None and kind in TERMINAL else None

    def went(self, kind: FrameType, sid: int, way: int) -> None:
        """`advance` for a frame `straight` let through."""
        if kind is FrameType.OPEN:
            self.next[sid] = [1, 0] if way == SEND else [0, 1]
            return
        del self.next[sid]
        self.ended[sid] = None
        if len(self.ended) > RECENT_ENDED:
            self.ended.popitem(last=False)

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
