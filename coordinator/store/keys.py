"""API keys: only a SHA-256 of each secret is kept, compared in constant time."""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.errors import CoordinatorError, KeyNameTaken, UnknownKey
from coordinator.store.core import (
    KEY_PREFIX,
    KEYS_GENERATION,
    SECRET_LEN,
    StoreCore,
    _bump,
    _sha256,
)
from coordinator.store.records import ApiKeyRecord, KeyScopes
from coordinator.store.schema import ApiKeyRow


class KeyStore(StoreCore):
    """API keys: create, verify, list, revoke, rotate."""

    def create_key(
        self, name: str, now: float, *, models: list[str] | None = None,
        scopes: KeyScopes | None = None,
    ) -> tuple[ApiKeyRecord, str]:
        """A new API key; returns its record and the plaintext, shown once and never stored.

        `models` is a shorthand for `KeyScopes(models=...)` (and wins over it)."""
        name = name.strip()
        if not name or len(name) > 200:
            raise CoordinatorError("an API key needs a name of 1 to 200 characters")
        scope = scopes or KeyScopes()
        if models:
            scope = KeyScopes(**{**_fields(scope), "models": tuple(models)})
        scopes_json = scope.to_json()
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(SECRET_LEN)
        with self._write() as s:
            live = s.scalars(select(ApiKeyRow.key_id).where(
                ApiKeyRow.name == name, ApiKeyRow.revoked_at.is_(None))).first()
            if live is not None:
                raise KeyNameTaken(name, live)
            row = ApiKeyRow(key_id=key_id, name=name, secret_hash=_sha256(secret.encode()),
                            scopes=scopes_json, created_at=now, revoked_at=None)
            s.add(row)
            s.flush()
            return ApiKeyRecord.of(row), f"{KEY_PREFIX}{key_id}_{secret}"

    def verify_key(self, plaintext: str) -> ApiKeyRecord | None:
        """The live key this plaintext proves, or None (malformed, unknown, wrong, revoked)."""
        if not plaintext.startswith(KEY_PREFIX) or len(plaintext) > 256:
            return None
        key_id, sep, secret = plaintext[len(KEY_PREFIX):].partition("_")
        if not sep or not key_id or not secret:
            return None
        with self._read() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None or row.revoked_at is not None:
                return None
            if not hmac.compare_digest(row.secret_hash, _sha256(secret.encode())):
                return None
            return ApiKeyRecord.of(row)

    def list_keys(self) -> list[ApiKeyRecord]:
        with self._read() as s:
            rows = s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.key_id))
            return [ApiKeyRecord.of(r) for r in rows]

    def revoke_key(self, key_id_or_name: str, now: float | None = None) -> bool:
        """Revoke a key by id or name; False if it was already revoked. Unknown: UnknownKey."""
        with self._write() as s:
            row = _find_key(s, key_id_or_name)
            if row.revoked_at is not None:
                return False
            row.revoked_at = now if now is not None else time.time()
            _bump(s, KEYS_GENERATION)
            return True

    def rotate_key(self, key_id_or_name: str, now: float) -> str:
        """A new secret for a live key (same id, name and scopes); the old one stops working."""
        del now  # kept in the signature for a rotated_at column; nothing records it yet
        secret = secrets.token_urlsafe(SECRET_LEN)
        with self._write() as s:
            row = _find_key(s, key_id_or_name)
            if row.revoked_at is not None:
                raise CoordinatorError(f"API key {row.name!r} ({row.key_id}) is revoked; "
                                       "create a new one instead")
            row.secret_hash = _sha256(secret.encode())
            _bump(s, KEYS_GENERATION)
            return f"{KEY_PREFIX}{row.key_id}_{secret}"



def _fields(scope: KeyScopes) -> dict[str, Any]:
    return {name: getattr(scope, name) for name in KeyScopes.__dataclass_fields__}



def _find_key(session: Session, key_id_or_name: str) -> ApiKeyRow:
    """By id; else the live key of that name; else the latest revoked one of that name."""
    row = session.get(ApiKeyRow, key_id_or_name, with_for_update=True)
    if row is not None:
        return row
    by_name = session.scalars(
        select(ApiKeyRow).where(ApiKeyRow.name == key_id_or_name).with_for_update()
        .order_by(ApiKeyRow.revoked_at.is_not(None), ApiKeyRow.created_at.desc())
    ).first()
    if by_name is None:
        raise UnknownKey(key_id_or_name)
    return by_name

