"""Noise IK proved on published vectors, and the CipherState rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tunnel.constants import MAX_NONCE
from tunnel.errors import FrameError, HandshakeError
from tunnel.noise import CipherState, HandshakeState, public_bytes

VECTORS = json.loads(
    (Path(__file__).parent / "vectors" / "noise_ik_25519_chachapoly_blake2s.json").read_text()
)["vectors"]


def _key(hex_: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_))


def _pair(v: dict[str, Any]) -> tuple[HandshakeState, HandshakeState]:
    init = HandshakeState(
        True,
        bytes.fromhex(v["init_prologue"]),
        _key(v["init_static"]),
        rs=bytes.fromhex(v["init_remote_static"]),
        e=_key(v["init_ephemeral"]),
    )
    resp = HandshakeState(
        False,
        bytes.fromhex(v["resp_prologue"]),
        _key(v["resp_static"]),
        e=_key(v["resp_ephemeral"]),
    )
    return init, resp


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["source"])
def test_ik_matches_published_vector(vector: dict[str, Any]) -> None:
    init, resp = _pair(vector)
    messages = vector["messages"]
    m1 = init.write_message(bytes.fromhex(messages[0]["payload"]))
    assert m1.hex() == messages[0]["ciphertext"]
    assert resp.read_message(m1).hex() == messages[0]["payload"]
    assert resp.rs == public_bytes(_key(vector["init_static"]))
    m2 = resp.write_message(bytes.fromhex(messages[1]["payload"]))
    assert m2.hex() == messages[1]["ciphertext"]
    assert init.read_message(m2).hex() == messages[1]["payload"]
    assert init.complete
    assert resp.complete
    assert init.handshake_hash == resp.handshake_hash
    if "handshake_hash" in vector:
        assert init.handshake_hash.hex() == vector["handshake_hash"]
    i_send, i_recv = init.split()
    r_recv, r_send = resp.split()
    for index, message in enumerate(messages[2:]):
        send, recv = (i_send, r_recv) if index % 2 == 0 else (r_send, i_recv)
        ct = send.encrypt_with_ad(b"", bytes.fromhex(message["payload"]))
        assert ct.hex() == message["ciphertext"]
        assert recv.decrypt_with_ad(b"", ct).hex() == message["payload"]


def test_vectors_cover_both_sources_and_the_handshake_hash() -> None:
    assert {v["source"] for v in VECTORS} == {"cacophony", "noise-c-basic"}
    assert any("handshake_hash" in v for v in VECTORS)


def test_failed_decrypt_does_not_advance_the_nonce() -> None:
    send, recv = CipherState(bytes(32)), CipherState(bytes(32))
    good = send.encrypt_with_ad(b"", b"hello")
    bad = bytes([good[0] ^ 1]) + good[1:]
    with pytest.raises(FrameError):
        recv.decrypt_with_ad(b"", bad)
    assert recv.n == 0
    assert recv.decrypt_with_ad(b"", good) == b"hello"
    assert recv.n == 1


def test_nonce_two_to_the_64_minus_one_is_refused() -> None:
    send, recv = CipherState(bytes(32)), CipherState(bytes(32))
    send.n = recv.n = MAX_NONCE - 1
    ct = send.encrypt_with_ad(b"", b"last")
    assert recv.decrypt_with_ad(b"", ct) == b"last"
    with pytest.raises(FrameError):
        send.encrypt_with_ad(b"", b"one too many")
    with pytest.raises(FrameError):
        recv.decrypt_with_ad(b"", ct)


def test_rekey_changes_the_key_and_keeps_both_ends_in_step() -> None:
    send, recv = CipherState(bytes(32)), CipherState(bytes(32))
    before = send.encrypt_with_ad(b"", b"x")
    recv.decrypt_with_ad(b"", before)
    send.rekey()
    recv.rekey()
    after = send.encrypt_with_ad(b"", b"x")
    assert recv.decrypt_with_ad(b"", after) == b"x"
    stale = CipherState(bytes(32))
    stale.n = 1
    with pytest.raises(FrameError):
        stale.decrypt_with_ad(b"", send.encrypt_with_ad(b"", b"y"))


def test_cipher_without_key_passes_through_and_cannot_rekey() -> None:
    empty = CipherState()
    assert not empty.has_key
    assert empty.encrypt_with_ad(b"", b"abc") == b"abc"
    assert empty.decrypt_with_ad(b"", b"abc") == b"abc"
    with pytest.raises(FrameError):
        empty.rekey()


def test_short_ciphertext_is_a_frame_error() -> None:
    with pytest.raises(FrameError):
        CipherState(bytes(32)).decrypt_with_ad(b"", b"short")


def _fresh_pair(rs: bytes | None = None) -> tuple[HandshakeState, HandshakeState]:
    responder_key = X25519PrivateKey.generate()
    init = HandshakeState(
        True, b"p", X25519PrivateKey.generate(), rs=rs or public_bytes(responder_key)
    )
    return init, HandshakeState(False, b"p", responder_key)


def test_initiator_pinning_the_wrong_key_fails_at_the_responder() -> None:
    init, resp = _fresh_pair(rs=public_bytes(X25519PrivateKey.generate()))
    with pytest.raises(HandshakeError):
        resp.read_message(init.write_message(b"hi"))


def test_handshake_refuses_out_of_turn_and_bad_lengths() -> None:
    init, resp = _fresh_pair()
    with pytest.raises(HandshakeError):
        resp.write_message(b"")
    with pytest.raises(HandshakeError):
        init.read_message(bytes(48))
    with pytest.raises(HandshakeError):
        resp.read_message(bytes(40))
    with pytest.raises(HandshakeError):
        init.split()
    with pytest.raises(HandshakeError):
        HandshakeState(True, b"", X25519PrivateKey.generate())
    with pytest.raises(HandshakeError):
        HandshakeState(True, b"", X25519PrivateKey.generate(), rs=b"short")


def test_low_order_point_is_a_handshake_error() -> None:
    _, resp = _fresh_pair()
    with pytest.raises(HandshakeError):
        resp.read_message(bytes(112))


def test_complete_handshake_refuses_more_messages() -> None:
    init, resp = _fresh_pair()
    resp.read_message(init.write_message(b""))
    init.read_message(resp.write_message(b""))
    with pytest.raises(HandshakeError):
        init.write_message(b"")
    with pytest.raises(HandshakeError):
        resp.read_message(bytes(112))
