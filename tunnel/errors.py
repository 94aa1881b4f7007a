"""The tunnel's one exception tree. Nothing else leaves `tunnel/`."""

from __future__ import annotations


class TunnelError(Exception):
    """Any failure of the secure link: bad bytes, bad keys, a closed peer."""


class HandshakeError(TunnelError):
    """The Noise handshake failed: wrong key, tampered or replayed message."""


class FrameError(TunnelError):
    """A transport frame failed to decrypt, decode or validate; the session is over."""


class TokenError(TunnelError):
    """An enrollment token that cannot be parsed."""


class RefusedError(TunnelError):
    """The peer refused us with a reason (HTTP 401/403 on the upgrade): do not retry."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"refused ({status}): {reason}")
        self.status = status
        self.reason = reason


class ClosedError(TunnelError):
    """The connection is closed; pending and future operations fail with this."""
