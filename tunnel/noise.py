"""The few Noise steps meshgate needs: Noise_IK_25519_ChaChaPoly_BLAKE2s.

Written from the Noise Protocol Framework, revision 34, sections 5 (processing
rules) and 7.5 (IK); proved on the published cacophony and noise-c vectors in
tests/tunnel/vectors/. Only the IK pattern exists here:

    <- s
    ...
    -> e, es, s, ss
    <- e, ee, se

Failures inside the handshake raise HandshakeError; a transport message that
does not decrypt raises FrameError. A failed decrypt never advances a nonce.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tunnel.constants import MAX_MESSAGE, MAX_NONCE, PROTOCOL_NAME, TAG_LEN
from tunnel.errors import FrameError, HandshakeError

HASHLEN = 32
DHLEN = 32


def _hash(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> tuple[bytes, ...]:
    """HKDF as the Noise spec defines it (section 4.3): two or three outputs of HASHLEN."""
    temp = _hmac(chaining_key, ikm)
    out1 = _hmac(temp, b"\x01")
    out2 = _hmac(temp, out1 + b"\x02")
    if outputs == 2:
        return out1, out2
    return out1, out2, _hmac(temp, out2 + b"\x03")


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point gives the all-zero secret
        raise HandshakeError("peer sent an invalid X25519 public key") from None


class CipherState:
    """A key and a 64-bit counter nonce (Noise section 5.1)."""

    def __init__(self, key: bytes | None = None) -> None:
        self.n = 0
        self._key: bytes | None = None
        self._aead: ChaCha20Poly1305 | None = None
        if key is not None:
            self._set_key(key)

    def _set_key(self, key: bytes) -> None:
        self._key = key
        self._aead = ChaCha20Poly1305(key)

    @property
    def has_key(self) -> bool:
        return self._key is not None

    @staticmethod
    def _nonce(n: int) -> bytes:
        return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        if self.n >= MAX_NONCE:
            raise FrameError("nonce exhausted: this session must end")
        ciphertext = self._aead.encrypt(self._nonce(self.n), plaintext, ad)
        self.n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return ciphertext
        if self.n >= MAX_NONCE:
            raise FrameError("nonce exhausted: this session must end")
        if len(ciphertext) < TAG_LEN:
            raise FrameError("message shorter than its authentication tag")
        try:
            plaintext = self._aead.decrypt(self._nonce(self.n), ciphertext, ad)
        except InvalidTag:
            raise FrameError("message did not decrypt (tampered, replayed or reordered)") from None
        self.n += 1
        return plaintext

    def rekey(self) -> None:
        """REKEY(k) = first 32 bytes of ENCRYPT(k, 2^64-1, zerolen, zeros); n is unchanged."""
        if self._aead is None:
            raise FrameError("cannot rekey a cipher without a key")
        self._set_key(self._aead.encrypt(self._nonce(MAX_NONCE), bytes(32), b"")[:32])


class SymmetricState:
    """The chaining key, the handshake hash and the handshake's CipherState (section 5.2)."""

    def __init__(self, protocol_name: bytes = PROTOCOL_NAME) -> None:
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = _hash(protocol_name)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, ikm, 2)
        self.cipher = CipherState(temp_k)

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h + data)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        try:
            plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        except FrameError:
            raise HandshakeError("handshake message failed to decrypt") from None
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = hkdf(self.ck, b"", 2)
        return CipherState(k1), CipherState(k2)


class HandshakeState:
    """One side of a Noise IK handshake (section 5.3). Two messages, then split()."""

    def __init__(
        self,
        initiator: bool,
        prologue: bytes,
        s: X25519PrivateKey,
        rs: bytes | None = None,
        e: X25519PrivateKey | None = None,
    ) -> None:
        if initiator and rs is None:
            raise HandshakeError("the IK initiator must know the responder's static key")
        if rs is not None and len(rs) != DHLEN:
            raise HandshakeError("a static key is 32 bytes")
        self.initiator = initiator
        self.s = s
        self.rs = rs
        self.e = e  # injectable only for test vectors
        self.re: bytes | None = None
        self._symmetric = SymmetricState()
        self._symmetric.mix_hash(prologue)
        self._symmetric.mix_hash(rs if initiator and rs is not None else public_bytes(s))
        self._step = 0  # 0: message 1 next, 1: message 2 next, 2: complete

    @property
    def complete(self) -> bool:
        return self._step == 2

    @property
    def handshake_hash(self) -> bytes:
        return self._symmetric.h

    def _my_turn(self) -> bool:
        return (self._step == 0) == self.initiator

    def write_message(self, payload: bytes) -> bytes:
        if self.complete or not self._my_turn():
            raise HandshakeError("not this side's turn to write a handshake message")
        sym = self._symmetric
        e = self.e if self.e is not None else X25519PrivateKey.generate()
        self.e = e
        e_pub = public_bytes(e)
        sym.mix_hash(e_pub)
        out = [e_pub]
        if self._step == 0:  # -> e, es, s, ss
            assert self.rs is not None
            sym.mix_key(_dh(e, self.rs))
            out.append(sym.encrypt_and_hash(public_bytes(self.s)))
            sym.mix_key(_dh(self.s, self.rs))
        else:  # <- e, ee, se
            assert self.re is not None
            assert self.rs is not None
            sym.mix_key(_dh(e, self.re))
            sym.mix_key(_dh(e, self.rs))
        out.append(sym.encrypt_and_hash(payload))
        message = b"".join(out)
        if len(message) > MAX_MESSAGE:
            raise HandshakeError("handshake message too long")
        self._step += 1
        return message

    def read_message(self, message: bytes) -> bytes:
        if self.complete or self._my_turn():
            raise HandshakeError("not this side's turn to read a handshake message")
        sym = self._symmetric
        need = DHLEN + (DHLEN + TAG_LEN if self._step == 0 else 0) + TAG_LEN
        if not DHLEN + TAG_LEN <= len(message) <= MAX_MESSAGE or len(message) < need:
            raise HandshakeError("handshake message has the wrong length")
        re, rest = message[:DHLEN], message[DHLEN:]
        sym.mix_hash(re)
        if self._step == 0:  # responder reads -> e, es, s, ss
            sym.mix_key(_dh(self.s, re))
            rs = sym.decrypt_and_hash(rest[: DHLEN + TAG_LEN])
            rest = rest[DHLEN + TAG_LEN :]
            sym.mix_key(_dh(self.s, rs))
            self.rs = rs
        else:  # initiator reads <- e, ee, se
            assert self.e is not None
            sym.mix_key(_dh(self.e, re))
            sym.mix_key(_dh(self.s, re))
        payload = sym.decrypt_and_hash(rest)
        self.re = re
        self._step += 1
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """(initiator-to-responder, responder-to-initiator) transport ciphers."""
        if not self.complete:
            raise HandshakeError("handshake is not complete")
        return self._symmetric.split()
