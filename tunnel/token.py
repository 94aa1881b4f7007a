"""Enrollment tokens: what an admin hands to a new node, as one pasteable string.

A token carries everything a node needs to make its first, and only trusted,
contact: where the coordinator's tunnel listens, the coordinator's static
X25519 key (Noise IK needs the responder's key up front, so the "fingerprint"
is the key itself and nothing is trusted on first use), the token's id and a
one-time secret that the node proves inside the encrypted handshake.

Wire form: ``mgt1.`` + unpadded base64url of a msgpack map. The coordinator
keeps only a hash of the secret.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import msgpack

from tunnel.errors import TokenError

PREFIX = "mgt1."
KEY_LEN = 32
SECRET_LEN = 32


@dataclass(frozen=True, slots=True)
class EnrollmentToken:
    url: str
    coordinator_key: bytes
    token_id: str
    secret: bytes
    expires_at: int

    def encode(self) -> str:
        packed = msgpack.packb(
            {
                "u": self.url,
                "k": self.coordinator_key,
                "i": self.token_id,
                "s": self.secret,
                "e": self.expires_at,
            }
        )
        return PREFIX + base64.urlsafe_b64encode(packed).rstrip(b"=").decode()

    @classmethod
    def decode(cls, text: str) -> EnrollmentToken:
        text = text.strip()
        if not text.startswith(PREFIX):
            raise TokenError(
                f"not a meshgate enrollment token (expected it to start with {PREFIX!r})"
            )
        raw = text[len(PREFIX) :]
        try:
            packed = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
            fields = msgpack.unpackb(packed, raw=False, strict_map_key=True, max_bin_len=1024)
        except (binascii.Error, ValueError, msgpack.ExtraData) as exc:
            raise TokenError(f"enrollment token is damaged ({exc}); copy it again") from None
        if not isinstance(fields, dict):
            raise TokenError("enrollment token is damaged; copy it again")
        try:
            token = cls(
                url=fields["u"],
                coordinator_key=fields["k"],
                token_id=fields["i"],
                secret=fields["s"],
                expires_at=fields["e"],
            )
        except KeyError:
            raise TokenError("enrollment token lacks a field; copy it again") from None
        ok = (
            isinstance(token.url, str)
            and token.url.startswith(("ws://", "wss://"))
            and isinstance(token.coordinator_key, bytes)
            and len(token.coordinator_key) == KEY_LEN
            and isinstance(token.token_id, str)
            and isinstance(token.secret, bytes)
            and len(token.secret) == SECRET_LEN
            and isinstance(token.expires_at, int)
        )
        if not ok:
            raise TokenError("enrollment token has a field of the wrong form; copy it again")
        return token
