"""Join a node-side and a coordinator-side in memory, as h11's tests/helpers.py does."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tunnel.frames import Frame, FrameType
from tunnel.handshake import Hello, InitiatorHandshake, ResponderHandshake
from tunnel.identity import Identity
from tunnel.noise import public_bytes
from tunnel.session import Session

NOW_MS = 1_700_000_000_000


def coordinator_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def join(
    node: Identity | None = None,
    coordinator: X25519PrivateKey | None = None,
    *,
    accept: dict[str, Any] | None = None,
    **hello: Any,
) -> tuple[Session, Session, Hello, dict[str, Any]]:
    """Run the whole handshake; return (node session, coordinator session, hello, accept)."""
    node = node or Identity.generate()
    coordinator = coordinator or coordinator_key()
    initiator = InitiatorHandshake(node, public_bytes(coordinator), now_ms=NOW_MS, **hello)
    responder = ResponderHandshake(coordinator)
    seen = responder.read_first(initiator.first_message())
    msg2, coordinator_side = responder.accept(accept if accept is not None else {"ok": True})
    node_side, accepted = initiator.finish(msg2)
    return node_side, coordinator_side, seen, accepted


def frame(kind: FrameType, stream_id: int = 0, body: Any = None) -> Frame:
    """A frame to seal; the session stamps its seq."""
    if body is None and kind not in (FrameType.CANCEL, FrameType.KEY_UPDATE):
        body = b"" if kind == FrameType.DATA else {}
    return Frame(kind, stream_id, 0, 0, body)


def deliver(
    sender: Session, receiver: Session, kind: FrameType, stream_id: int = 0, body: Any = None
) -> Frame:
    """Seal a frame on one side and open every message on the other; the opened frame."""
    got: list[Frame] = []
    for message in sender.seal(frame(kind, stream_id, body)):
        opened = receiver.open(message)
        if opened is not None:
            got.append(opened)
    assert len(got) == 1
    return got[0]
