"""meshgate's secure link: Noise IK over a websocket, frames multiplexed in streams.

Knows nothing of LLMs, nodes or coordinators' business. The core (noise,
identity, handshake, frames, compress, session, connection) is sans-I/O; `wire`,
`link`, `ws` and `mux` are a thin asyncio shell on websockets' sans-I/O protocol.
Rules: tunnel/DESIGN.md.
"""

from tunnel.backoff import backoff, retryable
from tunnel.errors import (
    ClosedError,
    FrameError,
    HandshakeError,
    RefusedError,
    TokenError,
    TunnelError,
)
from tunnel.frames import Frame, FrameType
from tunnel.handshake import Hello, InitiatorHandshake, ReplayGuard, ResponderHandshake
from tunnel.identity import Identity, did_to_ed25519, verify_binding
from tunnel.link import Link
from tunnel.mux import Mux, Stream, until_cancelled
from tunnel.session import Session
from tunnel.token import EnrollmentToken
from tunnel.ws import TunnelServer, connect, serve

__all__ = [
    "ClosedError",
    "EnrollmentToken",
    "Frame",
    "FrameError",
    "FrameType",
    "HandshakeError",
    "Hello",
    "Identity",
    "InitiatorHandshake",
    "Link",
    "Mux",
    "RefusedError",
    "ReplayGuard",
    "ResponderHandshake",
    "Session",
    "Stream",
    "TokenError",
    "TunnelError",
    "TunnelServer",
    "backoff",
    "connect",
    "did_to_ed25519",
    "retryable",
    "serve",
    "until_cancelled",
    "verify_binding",
]
