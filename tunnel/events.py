"""What the sans-I/O `Connection` hands the shell (`Opened`, `Received`, `Credit`,
`Pong`: one `Event` each) and each stream's credit and lifecycle (`StreamState`)."""

from __future__ import annotations

from dataclasses import dataclass

from tunnel.constants import INITIAL_STREAM_WINDOW
from tunnel.frames import Frame

__all__ = ["Credit", "Event", "Opened", "Pong", "Received", "StreamState"]


@dataclass(slots=True)
class Opened:
    """The peer opened a stream (its OPEN frame); answer on `frame.stream_id`."""

    frame: Frame


@dataclass(slots=True)
class Received:
    """A frame for the application: DATA, END, ERROR, CANCEL on an open stream, or a
    control frame (TELEMETRY, INVENTORY, COMMAND, RESULT, GOAWAY) on stream 0; `size`
    is its decoded payload's (what holding it costs)."""

    frame: Frame
    size: int = 0


@dataclass(slots=True)
class Credit:
    """The peer granted credit on `stream_id` (0: the connection): senders may go on."""

    stream_id: int


@dataclass(slots=True)
class Pong:
    """The PONG to our PING `stamp` arrived; `rtt_ms` is set."""

    stamp: int


Event = Opened | Received | Credit | Pong


class StreamState:
    """One stream's credit and lifecycle, both directions."""

    __slots__ = (
        "buffered",
        "id",
        "open_bytes",
        "peak_buffered",
        "peer_ended",
        "peer_fuses",
        "recv_limit",
        "recv_total",
        "released",
        "send_credit",
        "sent_end",
        "ungranted",
    )  # fmt: skip

    def __init__(self, stream_id: int, window: int, open_bytes: int = 0) -> None:
        self.id = stream_id
        self.send_credit = INITIAL_STREAM_WINDOW  # DATA bytes we may send
        self.recv_total = 0  # DATA bytes received
        self.recv_limit = window  # DATA bytes we allowed the peer to send, in all
        self.ungranted = 0  # bytes read but not yet granted back
        self.buffered = 0  # bytes received and not yet read by the application
        self.peak_buffered = 0
        self.sent_end = False
        self.peer_ended = False
        self.released = False  # the connection credit of unread bytes went back
        self.open_bytes = open_bytes  # the peer's OPEN payload, counted while open
        self.peer_fuses = False  # the peer opened it reading a fused last DATA + END

    @property
    def closed(self) -> bool:
        return self.sent_end or self.peer_ended
