"""Identity: did:key names, the binding signature, key files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tunnel.errors import TunnelError
from tunnel.identity import (
    Identity,
    b58decode,
    b58encode,
    did_to_ed25519,
    ed25519_to_did,
    verify_binding,
)

SPEC_DID = "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp"


def test_did_key_spec_example_round_trips() -> None:
    public = did_to_ed25519(SPEC_DID)
    assert len(public) == 32
    assert ed25519_to_did(public) == SPEC_DID


def test_generated_did_starts_like_every_ed25519_did_key() -> None:
    identity = Identity.generate()
    assert identity.did.startswith("did:key:z6Mk")
    assert did_to_ed25519(identity.did) == identity.ed25519_pub


@pytest.mark.parametrize(
    "bad",
    [
        "did:web:example.com",
        "did:key:z",
        "did:key:z0OIl",  # not base58
        "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme",  # secp256k1, not Ed25519
        "did:key:z" + "1" * 200,
    ],
)
def test_malformed_did_is_a_tunnel_error(bad: str) -> None:
    with pytest.raises(TunnelError):
        did_to_ed25519(bad)


def test_base58_keeps_leading_zero_bytes() -> None:
    for data in (b"", b"\x00", b"\x00\x00\x01", b"hello", bytes(range(40))):
        assert b58decode(b58encode(data)) == data
    assert b58encode(b"\x00\x00\x01") == "112"


def test_binding_signature_verifies_only_for_its_own_tunnel_key() -> None:
    identity = Identity.generate()
    sig = identity.binding_signature()
    assert verify_binding(identity.ed25519_pub, identity.x25519_pub, sig)
    other = Identity.generate()
    assert not verify_binding(identity.ed25519_pub, other.x25519_pub, sig)
    assert not verify_binding(other.ed25519_pub, identity.x25519_pub, sig)
    assert not verify_binding(b"short", identity.x25519_pub, sig)


def test_rotated_tunnel_key_keeps_the_did() -> None:
    identity = Identity.generate()
    rotated = identity.with_new_tunnel_key()
    assert rotated.did == identity.did
    assert rotated.x25519_pub != identity.x25519_pub


def test_identity_round_trips_through_bytes() -> None:
    identity = Identity.generate()
    again = Identity.from_bytes(identity.to_bytes())
    assert again.did == identity.did
    assert again.x25519_pub == identity.x25519_pub
    assert repr(again) == f"Identity({identity.did})"
    with pytest.raises(TunnelError):
        Identity.from_bytes(b"garbage")


def test_saved_identity_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    identity = Identity.generate()
    identity.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(path).did == identity.did


# The did:key method's published Ed25519 test vectors (w3c-ccg/did-method-key,
# test-vectors/ed25519-x25519.json): 32-byte seed, the did, and the public key the spec
# lists for it (publicKeyBase58 of the Ed25519VerificationKey2018 method).
DID_KEY_SPEC_VECTORS = [
    (
        "00" * 32,
        "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp",
        "4zvwRjXUKGfvwnParsHAS3HuSVzV5cA4McphgmoCtajS",
    ),
    (
        "00" * 31 + "01",
        "did:key:z6MkjchhfUsD6mmvni8mCdXHw216Xrm9bQe2mBH1P5RDjVJG",
        "6ASf5EcmmEHTgDJ4X4ZT5vT6iHVJBXPg5AN5YoTCpGWt",
    ),
    (
        "00" * 31 + "02",
        "did:key:z6MknGc3ocHs3zdPiJbnaaqDi58NGb4pk1Sp9WxWufuXSdxf",
        "8pM1DN3RiT8vbom5u1sNryaNT1nyL8CTTW3b5PwWXRBH",
    ),
    (
        "00" * 31 + "03",
        "did:key:z6MkvqoYXQfDDJRv8L4wKzxYeuKyVZBfi9Qo6Ro8MiLH3kDQ",
        "HPYVwAQmskwT1qEEeRzhoomyfyupJGASQQtCXSNG8XS2",
    ),
    (
        "00" * 31 + "04",
        "did:key:z6MkwW6aqMnjgrhJXFUko3NnZPGzVpkNzhYK7yEhnsibmLwL",
        "J3qYF7YJMKCqQke47UQwiHizgFUXapHxRxKmxbkar89x",
    ),
]


@pytest.mark.parametrize(("seed", "did", "public_b58"), DID_KEY_SPEC_VECTORS)
def test_did_key_matches_the_specs_published_ed25519_vectors(
    seed: str, did: str, public_b58: str
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    signing = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed))
    public = signing.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert public == b58decode(public_b58)  # our base58 agrees with the spec's
    assert b58encode(public) == public_b58
    assert ed25519_to_did(public) == did
    assert did_to_ed25519(did) == public
    identity = Identity(signing, X25519PrivateKey.generate())
    assert identity.did == did


def test_first_spec_vector_public_key_bytes() -> None:
    # the all-zero seed's Ed25519 public key, as RFC 8032 computes it
    public = did_to_ed25519(DID_KEY_SPEC_VECTORS[0][1])
    assert public.hex() == "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"
