"""The meshgate handshake on Noise IK, joined in memory."""

from __future__ import annotations

import msgpack
import pytest
from tunnel_helpers import NOW_MS, coordinator_key, deliver, join

from tunnel.constants import PROLOGUE
from tunnel.errors import HandshakeError
from tunnel.frames import FrameType
from tunnel.handshake import InitiatorHandshake, ReplayGuard, ResponderHandshake
from tunnel.identity import Identity
from tunnel.noise import HandshakeState, public_bytes


def test_handshake_names_the_node_and_carries_both_payloads() -> None:
    node = Identity.generate()
    node_side, coord_side, hello, accept = join(
        node,
        enroll=("tok1", b"s" * 32),
        info={"host": "box", "cores": 8},
        accept={"did": "x", "labels": {"site": "a"}},
    )
    assert hello.did == node.did
    assert hello.ed25519_pub == node.ed25519_pub
    assert hello.tunnel_key == node.x25519_pub
    assert hello.timestamp_ms == NOW_MS
    assert hello.enroll == ("tok1", b"s" * 32)
    assert hello.info == {"host": "box", "cores": 8}
    assert accept == {"did": "x", "labels": {"site": "a"}}
    assert deliver(node_side, coord_side, FrameType.PING, body={"t": 1}).body == {"t": 1}
    assert deliver(coord_side, node_side, FrameType.PONG, body={"t": 1}).body == {"t": 1}


def test_node_pinning_the_wrong_coordinator_key_fails_at_the_responder() -> None:
    node = Identity.generate()
    initiator = InitiatorHandshake(node, public_bytes(coordinator_key()), now_ms=NOW_MS)
    with pytest.raises(HandshakeError, match="another coordinator key"):
        ResponderHandshake(coordinator_key()).read_first(initiator.first_message())


def test_impostor_coordinator_cannot_produce_a_reply_the_node_accepts() -> None:
    real, impostor = coordinator_key(), coordinator_key()
    node = Identity.generate()
    initiator = InitiatorHandshake(node, public_bytes(real), now_ms=NOW_MS)
    initiator.first_message()
    # The impostor runs a genuine handshake of its own with the same node identity
    # and replays its message 2; it cannot make one bound to the real key.
    own = InitiatorHandshake(node, public_bytes(impostor), now_ms=NOW_MS)
    responder = ResponderHandshake(impostor)
    responder.read_first(own.first_message())
    msg2, _ = responder.accept({"did": node.did})
    with pytest.raises(HandshakeError, match="pinned coordinator key"):
        initiator.finish(msg2)
    fresh = InitiatorHandshake(node, public_bytes(real), now_ms=NOW_MS)
    fresh.first_message()
    with pytest.raises(HandshakeError):
        fresh.finish(bytes(64))


def test_tampered_first_message_is_refused() -> None:
    coordinator = coordinator_key()
    msg1 = InitiatorHandshake(
        Identity.generate(), public_bytes(coordinator), now_ms=NOW_MS
    ).first_message()
    for index in (0, 40, len(msg1) - 1):
        tampered = bytearray(msg1)
        tampered[index] ^= 0x01
        with pytest.raises(HandshakeError):
            ResponderHandshake(coordinator).read_first(bytes(tampered))


def _raw_msg1(coordinator: bytes, payload: object, node: Identity | None = None) -> bytes:
    node = node or Identity.generate()
    noise = HandshakeState(True, PROLOGUE, node.tunnel_key, rs=coordinator)
    data = payload if isinstance(payload, bytes) else msgpack.packb(payload)
    return noise.write_message(data)


def _hello(node: Identity, **override: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "v": 1,
        "id": node.ed25519_pub,
        "sig": node.binding_signature(),
        "ts": NOW_MS,
        "enroll": None,
        "info": {},
    }
    fields.update(override)
    return fields


def test_forged_binding_signature_is_refused() -> None:
    coordinator = coordinator_key()
    node, victim = Identity.generate(), Identity.generate()
    # The node claims the victim's identity but cannot sign its own tunnel key with it.
    payload = _hello(node, id=victim.ed25519_pub, sig=victim.binding_signature())
    with pytest.raises(HandshakeError, match="binding signature"):
        ResponderHandshake(coordinator).read_first(
            _raw_msg1(public_bytes(coordinator), payload, node)
        )


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"v": 2}, "version"),
        ({"id": b"short"}, "32-byte"),
        ({"ts": "soon"}, "ts"),
        ({"ts": -1}, "ts"),
        ({"enroll": ["tok"]}, "enroll"),
        ({"info": {"k": [1]}}, "info"),
        ({"info": {"k": True}}, "info"),
    ],
)
def test_malformed_hello_fields_are_refused(override: dict[str, object], reason: str) -> None:
    coordinator = coordinator_key()
    node = Identity.generate()
    msg1 = _raw_msg1(public_bytes(coordinator), _hello(node, **override), node)
    with pytest.raises(HandshakeError, match=reason):
        ResponderHandshake(coordinator).read_first(msg1)


@pytest.mark.parametrize("payload", [b"\xc1", b"\x93\x01\x02\x03", msgpack.packb({1: 2})])
def test_hello_that_is_not_a_msgpack_map_is_refused(payload: bytes) -> None:
    coordinator = coordinator_key()
    with pytest.raises(HandshakeError):
        ResponderHandshake(coordinator).read_first(_raw_msg1(public_bytes(coordinator), payload))


def test_oversized_hello_is_refused_on_both_ends() -> None:
    coordinator = coordinator_key()
    big = {"blob": "x" * 5000}
    initiator = InitiatorHandshake(
        Identity.generate(), public_bytes(coordinator), now_ms=NOW_MS, info=big
    )
    with pytest.raises(HandshakeError, match="too large"):
        initiator.first_message()
    with pytest.raises(HandshakeError, match="too large"):
        ResponderHandshake(coordinator).read_first(bytes(5000))


def test_accept_before_read_first_and_oversized_accept_are_refused() -> None:
    coordinator = coordinator_key()
    with pytest.raises(HandshakeError):
        ResponderHandshake(coordinator).accept({})
    responder = ResponderHandshake(coordinator)
    responder.read_first(
        InitiatorHandshake(
            Identity.generate(), public_bytes(coordinator), now_ms=NOW_MS
        ).first_message()
    )
    with pytest.raises(HandshakeError, match="too large"):
        responder.accept({"x": "y" * 5000})


def test_accept_that_is_not_a_map_is_refused_by_the_node() -> None:
    coordinator = coordinator_key()
    initiator = InitiatorHandshake(Identity.generate(), public_bytes(coordinator), now_ms=NOW_MS)
    responder = HandshakeState(False, PROLOGUE, coordinator)
    responder.read_message(initiator.first_message())
    with pytest.raises(HandshakeError, match="not a map"):
        initiator.finish(responder.write_message(msgpack.packb([1, 2])))


def test_replayed_first_message_is_refused_by_the_replay_guard() -> None:
    guard = ReplayGuard()
    guard.check("did:a", NOW_MS, NOW_MS)
    with pytest.raises(HandshakeError, match="replayed"):
        guard.check("did:a", NOW_MS, NOW_MS + 1000)
    guard.check("did:a", NOW_MS + 1, NOW_MS + 1000)
    guard.check("did:b", NOW_MS, NOW_MS)  # per node


def test_replay_guard_refuses_clock_skew_over_five_minutes() -> None:
    guard = ReplayGuard()
    with pytest.raises(HandshakeError, match="clock"):
        guard.check("did:a", NOW_MS - 301_000, NOW_MS)
    with pytest.raises(HandshakeError, match="clock"):
        guard.check("did:a", NOW_MS + 301_000, NOW_MS)
    guard.check("did:a", NOW_MS + 299_000, NOW_MS)


def test_replay_guard_forgets_only_entries_that_skew_already_refuses() -> None:
    guard = ReplayGuard()
    for n in range(4100):
        guard.check(f"did:{n}", NOW_MS, NOW_MS)
    late = NOW_MS + 400_000
    for n in range(8200):  # the table doubles past its last sweep: the next one drops them
        guard.check(f"did:new{n}", late, late)
    assert "did:0" not in guard._last
    assert "did:new0" in guard._last  # within the window: kept
    with pytest.raises(HandshakeError):
        guard.check("did:0", NOW_MS, late)


def test_a_reconnect_storm_does_not_sweep_the_replay_table_on_every_handshake() -> None:
    guard = ReplayGuard()
    sweeps, table = 0, guard._last
    for n in range(20_000):  # 20,000 nodes reconnect within the skew window
        guard.check(f"did:{n}", NOW_MS + n, NOW_MS + n)
        if guard._last is not table:
            sweeps, table = sweeps + 1, guard._last
    assert len(guard._last) == 20_000
    assert sweeps <= 4  # at 4,097, 8,195, 16,391 entries: not ~16,000 sweeps
