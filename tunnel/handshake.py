"""The meshgate handshake: Noise IK with the prologue ``meshgate/1`` and two payloads.

Message 1 (node -> coordinator) carries a msgpack map::

    {"v": 1, "id": ed25519_pub, "sig": binding signature over the node's Noise
     static key, "ts": unix ms, "enroll": [token_id, secret] | None,
     "info": {str: str | int}}

Message 2 (coordinator -> node) carries the map the coordinator's caller chose
(the "accept" map). The responder learns *who* connected from message 1 and
returns a `Hello`; deciding whether that node is welcome (known, not revoked,
a valid token) is the caller's job, as is the `ReplayGuard` check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tunnel.constants import HELLO_VERSION, MAX_HANDSHAKE_MESSAGE, MAX_SKEW_MS, PROLOGUE
from tunnel.errors import HandshakeError
from tunnel.identity import Identity, ed25519_to_did, verify_binding
from tunnel.noise import HandshakeState
from tunnel.session import Session


@dataclass(frozen=True)
class Hello:
    """Who is on the other end of message 1, checked as far as cryptography can."""

    did: str
    ed25519_pub: bytes
    tunnel_key: bytes
    timestamp_ms: int
    enroll: tuple[str, bytes] | None
    info: dict[str, str | int] = field(default_factory=dict)


def _unpack(payload: bytes, what: str) -> dict[Any, Any]:
    try:
        value = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_HANDSHAKE_MESSAGE,
            max_str_len=MAX_HANDSHAKE_MESSAGE,
            max_array_len=64,
            max_map_len=64,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise HandshakeError(f"{what} is not valid msgpack") from None
    if not isinstance(value, dict):
        raise HandshakeError(f"{what} is not a map")
    return value


def _check_info(info: Any) -> dict[str, str | int]:
    if info is None:
        return {}
    if not isinstance(info, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int) and not isinstance(v, bool)
        for k, v in info.items()
    ):
        raise HandshakeError("hello info must map str to str or int")
    return dict(info)


def _check_enroll(enroll: Any) -> tuple[str, bytes] | None:
    if enroll is None:
        return None
    ok = (
        isinstance(enroll, list | tuple)
        and len(enroll) == 2
        and isinstance(enroll[0], str)
        and isinstance(enroll[1], bytes)
    )
    if not ok:
        raise HandshakeError("hello enroll must be [token_id, secret]")
    return enroll[0], enroll[1]


def parse_hello(payload: bytes, tunnel_key: bytes) -> Hello:
    """Validate message 1's payload against the Noise static key that carried it."""
    fields = _unpack(payload, "hello")
    if fields.get("v") != HELLO_VERSION:
        version = fields.get("v")
        raise HandshakeError(f"unsupported hello version {version!r} (want {HELLO_VERSION})")
    ed_pub, sig, ts = fields.get("id"), fields.get("sig"), fields.get("ts")
    if not isinstance(ed_pub, bytes) or len(ed_pub) != 32:
        raise HandshakeError("hello id must be a 32-byte Ed25519 key")
    if not isinstance(sig, bytes) or not verify_binding(ed_pub, tunnel_key, sig):
        raise HandshakeError("bad binding signature: the identity did not sign this tunnel key")
    if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0:
        raise HandshakeError("hello ts must be a non-negative int (unix ms)")
    return Hello(
        did=ed25519_to_did(ed_pub),
        ed25519_pub=ed_pub,
        tunnel_key=tunnel_key,
        timestamp_ms=ts,
        enroll=_check_enroll(fields.get("enroll")),
        info=_check_info(fields.get("info")),
    )


class InitiatorHandshake:
    """The node's side: message 1 out, message 2 in, a Session out."""

    def __init__(
        self,
        identity: Identity,
        coordinator_key: bytes,
        *,
        now_ms: int,
        enroll: tuple[str, bytes] | None = None,
        info: dict[str, str | int] | None = None,
    ) -> None:
        self.identity = identity
        self._noise = HandshakeState(True, PROLOGUE, identity.tunnel_key, rs=coordinator_key)
        self._hello = {
            "v": HELLO_VERSION,
            "id": identity.ed25519_pub,
            "sig": identity.binding_signature(),
            "ts": now_ms,
            "enroll": list(enroll) if enroll is not None else None,
            "info": _check_info(info),
        }

    def first_message(self) -> bytes:
        message = self._noise.write_message(msgpack.packb(self._hello))
        if len(message) > MAX_HANDSHAKE_MESSAGE:
            raise HandshakeError("hello too large (keep info small)")
        return message

    def finish(self, msg2: bytes) -> tuple[Session, dict[str, Any]]:
        try:
            payload = self._noise.read_message(msg2)
        except HandshakeError as exc:
            raise HandshakeError(
                f"coordinator's reply did not decrypt ({exc}): is the pinned coordinator key right?"
            ) from None
        accept = _unpack(payload, "accept")
        send, recv = self._noise.split()
        return Session(send, recv), accept


class ResponderHandshake:
    """The coordinator's side: read message 1, let the caller decide, answer with message 2."""

    def __init__(self, static_key: X25519PrivateKey) -> None:
        self._noise = HandshakeState(False, PROLOGUE, static_key)
        self.hello: Hello | None = None

    def read_first(self, msg1: bytes) -> Hello:
        if len(msg1) > MAX_HANDSHAKE_MESSAGE:
            raise HandshakeError("hello too large")
        try:
            payload = self._noise.read_message(msg1)
        except HandshakeError as exc:
            raise HandshakeError(
                f"hello did not decrypt ({exc}): the node holds another coordinator key, "
                "or the message was altered"
            ) from None
        assert self._noise.rs is not None
        self.hello = parse_hello(payload, self._noise.rs)
        return self.hello

    def accept(self, accept: dict[str, Any]) -> tuple[bytes, Session]:
        if self.hello is None:
            raise HandshakeError("read_first must succeed before accept")
        message = self._noise.write_message(msgpack.packb(accept))
        if len(message) > MAX_HANDSHAKE_MESSAGE:
            raise HandshakeError("accept map too large")
        recv, send = self._noise.split()
        return message, Session(send, recv)


PRUNE_AT = 4096  # the replay table is swept for stale entries past this size (then 2x)


class ReplayGuard:
    """Refuse a first message whose timestamp is not newer than the last accepted one
    for that node, or is more than five minutes away from now (as WireGuard's TAI64N).

    Pure and in memory: a coordinator that must survive restarts also keeps the
    last timestamp in its store.
    """

    def __init__(self, max_skew_ms: int = MAX_SKEW_MS) -> None:
        self.max_skew_ms = max_skew_ms
        self._last: dict[str, int] = {}
        self._prune_at = PRUNE_AT

    def check(self, did: str, ts_ms: int, now_ms: int) -> None:
        if abs(ts_ms - now_ms) > self.max_skew_ms:
            raise HandshakeError(
                f"handshake timestamp is {abs(ts_ms - now_ms) / 1000:.0f} s off: check the clock"
            )
        last = self._last.get(did)
        if last is not None and ts_ms <= last:
            raise HandshakeError("replayed handshake: timestamp not newer than the last one")
        self._last[did] = ts_ms
        self._forget_older_than(now_ms - self.max_skew_ms)

    def _forget_older_than(self, cutoff_ms: int) -> None:
        """Entries older than the skew window can no longer admit a replay; drop them once
        the table doubled since the last sweep (amortized O(1) a handshake: 10,000 nodes
        reconnecting within the window made every handshake sweep all of them)."""
        if len(self._last) > self._prune_at:
            self._last = {d: t for d, t in self._last.items() if t >= cutoff_ms}
            self._prune_at = max(PRUNE_AT, 2 * len(self._last))
