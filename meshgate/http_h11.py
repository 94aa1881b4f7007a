"""uvicorn's h11 protocol with the bounds of :mod:`meshgate.http_protocols` (opt-in:
``MESHGATE_HTTP_PARSER=h11``; imported only then, so h11 is not loaded otherwise)."""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from meshgate.http_protocols import Guards

__all__ = ["GuardedH11Protocol"]


class GuardedH11Protocol(Guards, H11Protocol):
    """uvicorn's h11 protocol, bounded (h11 limits the head's size itself)."""

    def awaiting_head(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def reading_body(self) -> bool:
        return self.conn.their_state is h11.SEND_BODY
