"""A node's identity: a long-lived Ed25519 key (its name, as a did:key) plus its
X25519 tunnel key, bound to it by a signature (as libp2p binds identity to its
Noise key), so the tunnel key can rotate without the node changing its name.

On disk: ``MGID1`` + 32-byte Ed25519 seed + 32-byte X25519 private key,
written with mode 0600 by `save`.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from tunnel.constants import BINDING_CONTEXT
from tunnel.errors import TunnelError
from tunnel.noise import public_bytes

MAGIC = b"MGID1"
DID_PREFIX = "did:key:z"
ED25519_MULTICODEC = b"\xed\x01"
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


def b58encode(data: bytes) -> str:
    """Base58 with the Bitcoin alphabet (base58btc); leading zero bytes become '1'."""
    zeros = len(data) - len(data.lstrip(b"\x00"))
    number = int.from_bytes(data, "big")
    out = []
    while number:
        number, rem = divmod(number, 58)
        out.append(_B58[rem])
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    number = 0
    for char in text:
        if char not in _B58_INDEX:
            raise TunnelError(f"not base58: {char!r}")
        number = number * 58 + _B58_INDEX[char]
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\x00" * zeros + body


def ed25519_to_did(public: bytes) -> str:
    return DID_PREFIX + b58encode(ED25519_MULTICODEC + public)


def did_to_ed25519(did: str) -> bytes:
    """The 32-byte Ed25519 public key named by a did:key; TunnelError when malformed."""
    if not isinstance(did, str) or not did.startswith(DID_PREFIX) or len(did) > 128:
        raise TunnelError(f"not an Ed25519 did:key: {did!r}")
    raw = b58decode(did[len(DID_PREFIX) :])
    if len(raw) != 34 or not raw.startswith(ED25519_MULTICODEC):
        raise TunnelError(f"not an Ed25519 did:key: {did!r}")
    return raw[2:]


def binding_message(x25519_pub: bytes) -> bytes:
    return BINDING_CONTEXT + x25519_pub


def verify_binding(ed_pub: bytes, x_pub: bytes, sig: bytes) -> bool:
    """True when `sig` is `ed_pub`'s signature binding the tunnel key `x_pub`."""
    try:
        Ed25519PublicKey.from_public_bytes(ed_pub).verify(sig, binding_message(x_pub))
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    def __init__(self, signing_key: Ed25519PrivateKey, tunnel_key: X25519PrivateKey) -> None:
        self.signing_key = signing_key
        self.tunnel_key = tunnel_key

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    def with_new_tunnel_key(self) -> Identity:
        """Same name, fresh X25519 key: what a tunnel-key rotation looks like."""
        return Identity(self.signing_key, X25519PrivateKey.generate())

    @property
    def ed25519_pub(self) -> bytes:
        return self.signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def x25519_pub(self) -> bytes:
        return public_bytes(self.tunnel_key)

    @property
    def did(self) -> str:
        return ed25519_to_did(self.ed25519_pub)

    def binding_signature(self) -> bytes:
        return self.signing_key.sign(binding_message(self.x25519_pub))

    def to_bytes(self) -> bytes:
        raw = (Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return MAGIC + self.signing_key.private_bytes(*raw) + self.tunnel_key.private_bytes(*raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> Identity:
        if len(data) != len(MAGIC) + 64 or not data.startswith(MAGIC):
            raise TunnelError("not a meshgate identity file (damaged or of another version)")
        body = data[len(MAGIC) :]
        return cls(
            Ed25519PrivateKey.from_private_bytes(body[:32]),
            X25519PrivateKey.from_private_bytes(body[32:]),
        )

    def save(self, path: Path) -> None:
        """Write the private keys, readable by the owner only (0600, even if the file existed)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, self.to_bytes())
        finally:
            os.close(fd)

    @classmethod
    def load(cls, path: Path) -> Identity:
        return cls.from_bytes(Path(path).read_bytes())

    def __repr__(self) -> str:
        return f"Identity({self.did})"
