"""Enrollment tokens: create, redeem (enrolls a node), list, revoke."""

from __future__ import annotations

import hmac
import secrets

from sqlalchemy import select, update

from coordinator.errors import CoordinatorError, EnrollmentRefused, UnknownToken
from coordinator.store.core import MAX_TOKEN_USES, SECRET_LEN, StoreCore, _rowcount, _sha256, iso
from coordinator.store.records import NodeRecord, TokenRecord
from coordinator.store.schema import NodeRow, TokenRow, TokenUseRow


class TokenStore(StoreCore):
    """Enrollment tokens and the enrollments they paid for."""

    def create_token(
        self, ttl_s: int, labels: dict[str, str], now: float, *, uses: int = 1
    ) -> tuple[str, bytes]:
        """A new enrollment token good for `uses` enrollments; returns (token_id, secret).

        Only the secret's hash is kept."""
        if ttl_s <= 0:
            raise CoordinatorError(f"a token's lifetime must be positive, not {ttl_s} s")
        if isinstance(uses, bool) or not isinstance(uses, int) or not 1 <= uses <= MAX_TOKEN_USES:
            raise CoordinatorError(f"a token's uses must be 1 to {MAX_TOKEN_USES}, not {uses!r}")
        token_id = secrets.token_urlsafe(9)
        secret = secrets.token_bytes(SECRET_LEN)
        with self._write() as s:
            s.add(TokenRow(token_id=token_id, secret_hash=_sha256(secret), labels=dict(labels),
                           created_at=now, expires_at=now + ttl_s, used_at=None, used_by=None,
                           max_uses=uses, uses=0, revoked_at=None))
        return token_id, secret

    def redeem_token(self, token_id: str, secret: bytes, did: str, now: float) -> NodeRecord:
        """Spend one use of a token to enroll `did`; raises EnrollmentRefused with the reason."""
        with self._write() as s:
            token = s.scalars(
                select(TokenRow).where(TokenRow.token_id == token_id).with_for_update()
            ).one_or_none()
            if token is None:
                raise EnrollmentRefused("unknown enrollment token")
            if not hmac.compare_digest(token.secret_hash, _sha256(secret)):
                raise EnrollmentRefused("enrollment token secret does not match")
            if token.revoked_at is not None:
                raise EnrollmentRefused(f"enrollment token was revoked at {iso(token.revoked_at)}")
            if token.uses >= token.max_uses:
                raise EnrollmentRefused(_used_message(token))
            if now >= token.expires_at:
                raise EnrollmentRefused(f"enrollment token expired at {iso(token.expires_at)}")
            node = s.get(NodeRow, did, with_for_update=True)
            if node is not None and node.revoked_at is None:
                raise EnrollmentRefused(f"node already enrolled: {did}")
            spent = _rowcount(s, update(TokenRow)
                              .where(TokenRow.token_id == token_id,
                                     TokenRow.uses < TokenRow.max_uses)
                              .values(uses=TokenRow.uses + 1, used_at=now, used_by=did))
            if spent != 1:  # another transaction won the race for the last use
                s.refresh(token)
                raise EnrollmentRefused(_used_message(token))
            s.add(TokenUseRow(token_id=token_id, did=did, used_at=now))
            if node is None:
                node = NodeRow(did=did, models=[], last_seen=None, last_ts_ms=None)
                s.add(node)
            node.labels = dict(token.labels)
            node.enrolled_at = now
            node.token_id = token_id
            node.revoked_at = None
            node.models = []
            node.last_seen = None
            s.flush()
            return NodeRecord.of(node)

    def list_tokens(self) -> list[TokenRecord]:
        with self._read() as s:
            rows = s.scalars(select(TokenRow).order_by(TokenRow.created_at, TokenRow.token_id))
            return [TokenRecord.of(r) for r in rows]

    def token_uses(self, token_id: str) -> list[tuple[str, float]]:
        """(did, when) of each enrollment the token paid for, oldest first."""
        query = (select(TokenUseRow.did, TokenUseRow.used_at)
                 .where(TokenUseRow.token_id == token_id).order_by(TokenUseRow.id))
        with self._read() as s:
            return [(str(d), float(t)) for d, t in s.execute(query)]

    def revoke_token(self, token_id: str, now: float) -> bool:
        """Refuse a token's remaining uses; False if it was already revoked."""
        with self._write() as s:
            if s.get(TokenRow, token_id) is None:
                raise UnknownToken(token_id)
            return _rowcount(s, update(TokenRow)
                             .where(TokenRow.token_id == token_id, TokenRow.revoked_at.is_(None))
                             .values(revoked_at=now)) == 1


def _used_message(token: TokenRow) -> str:
    when = iso(token.used_at) if token.used_at is not None else "an unknown time"
    if token.max_uses > 1:
        return (f"enrollment token has been used all {token.max_uses} times "
                f"(last by {token.used_by} at {when})")
    return f"enrollment token was already used (by {token.used_by} at {when})"

