"""A whole answer in one frame, sans I/O (a mixin of `Connection`): END carrying the
stream's last DATA.

An answer that fits in one DATA frame is DATA then END: two frames to stamp, encode,
decode, sequence-check and hand on, each way. The opener of a stream that reads the
fused form says so (FLAG_FUSE on its OPEN: this code always does); the answering side
may then send one END with FLAG_DATA whose body's "data" is that DATA (`send_last`).
The receiver unfolds it into the two frames it stands for, with the same checks: the
data takes credit from the stream and the connection as DATA does, and passing the
credit is the same protocol violation. A peer that did not say so gets DATA then END.
"""

from __future__ import annotations

from typing import Any

from tunnel.constants import FLAG_DATA, FLAG_FUSE, FRAME_CAPS
from tunnel.events import Event, StreamState
from tunnel.frames import Frame, FrameType

__all__ = ["FLAG_DATA", "FLAG_FUSE", "FUSED_MAX", "Fused"]

#: the most data an END carries fused (room left under END's cap for its other fields)
FUSED_MAX = FRAME_CAPS[FrameType.END] // 2


class Fused:
    """`send_last` and the receiving side's unfolding, for `Connection`."""

    send_credit: int
    streams: dict[int, StreamState]

    def _check(self) -> None:
        raise NotImplementedError  # `Connection._check`

    def _queue_stream(self, kind: FrameType, stream_id: int, flags: int, body: Any) -> None:
        raise NotImplementedError  # `Connection._queue_stream`

    def _forget(self, state: StreamState) -> None:
        raise NotImplementedError  # `Connection._forget`

    def release(self, state: StreamState) -> None:
        raise NotImplementedError  # `Grants.release`

    def _on_data(self, frame: Frame, events: list[Event]) -> None:
        raise NotImplementedError  # `Connection._on_data`

    def send_last(self, state: StreamState, data: bytes, end: dict[str, Any]) -> bool:
        """Queue `data` and then END (body `end`) as one frame, if the peer reads that
        (its OPEN said so), the credit allows all of `data` now and `end` has no "data"
        of its own; False if not (nothing queued: send DATA, then END)."""
        self._check()
        n = len(data)
        if (not state.peer_fuses or state.closed or n > FUSED_MAX or "data" in end
                or n > state.send_credit or n > self.send_credit):
            return False
        self._queue_stream(FrameType.END, state.id, FLAG_DATA, {**end, "data": data})
        state.send_credit -= n
        self.send_credit -= n
        state.sent_end = True
        self._forget(state)
        self.release(state)
        return True

    def _on_fused(self, frame: Frame, events: list[Event]) -> Frame:
        """An END with FLAG_DATA: its data as a DATA frame's (credit checked, a `Received`
        when the stream is open), and the END it stands for (no "data", no flags)."""
        body = frame.body
        data = body.pop("data")  # the decoder checked it is bytes; the map is ours
        self._on_data(Frame(FrameType.DATA, frame.stream_id, frame.seq, 0, data), events)
        return Frame(FrameType.END, frame.stream_id, frame.seq, 0, body)
