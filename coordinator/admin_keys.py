"""Admin keys: what the admin API and the web pane ask for, never an app's API key.

An admin key looks like ``mga_<id>_<secret>`` (an app key starts ``mg_``, and the
two live in different tables, so one can never pass for the other). Only a
SHA-256 of the secret is stored. The first `serve` (or `init`) of a state
directory with no live admin key makes one and writes it to ``admin.key`` in
the state directory, mode 0600 from the moment it exists; `admin-key create`
makes more (one per operator, each revocable).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import String, select, update
from sqlalchemy.orm import Mapped, mapped_column

from coordinator.errors import CoordinatorError
from coordinator.store import Base, Store

ADMIN_PREFIX = "mga_"
ADMIN_KEY_FILE = "admin.key"
SECRET_BYTES = 32


class AdminKeyRow(Base):
    __tablename__ = "admin_keys"
    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    secret_hash: Mapped[bytes]
    created_at: Mapped[float]
    revoked_at: Mapped[float | None]


@dataclass(frozen=True, slots=True)
class AdminKeyRecord:
    key_id: str
    name: str
    created_at: float
    revoked_at: float | None

    @classmethod
    def of(cls, row: AdminKeyRow) -> AdminKeyRecord:
        return cls(row.key_id, row.name, row.created_at, row.revoked_at)


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


class AdminKeys:
    """The admin keys in one store (the table is made on first use)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        immediate = store.engine.execution_options(meshgate_begin="IMMEDIATE")
        with immediate.begin() as conn:
            Base.metadata.create_all(conn, tables=[AdminKeyRow.__table__])  # type: ignore[list-item]

    def create(self, name: str, now: float) -> tuple[AdminKeyRecord, str]:
        name = name.strip()
        if not name or len(name) > 200:
            raise CoordinatorError("an admin key needs a name of 1 to 200 characters")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(SECRET_BYTES)
        row = AdminKeyRow(key_id=key_id, name=name, secret_hash=_sha256(secret),
                          created_at=now, revoked_at=None)
        with self.store.session(write=True) as s:
            s.add(row)
        return AdminKeyRecord.of(row), f"{ADMIN_PREFIX}{key_id}_{secret}"

    def verify(self, plaintext: str) -> AdminKeyRecord | None:
        """The live admin key this plaintext proves, or None."""
        if not plaintext.startswith(ADMIN_PREFIX) or len(plaintext) > 256:
            return None
        key_id, sep, secret = plaintext[len(ADMIN_PREFIX):].partition("_")
        if not sep or not key_id or not secret:
            return None
        with self.store.session() as s:
            row = s.get(AdminKeyRow, key_id)
            if row is None or row.revoked_at is not None:
                return None
            if not hmac.compare_digest(row.secret_hash, _sha256(secret)):
                return None
            return AdminKeyRecord.of(row)

    def list(self) -> list[AdminKeyRecord]:
        with self.store.session() as s:
            rows = s.scalars(select(AdminKeyRow).order_by(AdminKeyRow.created_at))
            return [AdminKeyRecord.of(r) for r in rows]

    def revoke(self, key_id: str, now: float) -> bool:
        with self.store.session(write=True) as s:
            if s.get(AdminKeyRow, key_id) is None:
                raise CoordinatorError(f"unknown admin key {key_id!r} "
                                       "(see 'meshgate-coordinator admin-key list')")
            result = s.execute(update(AdminKeyRow)
                               .where(AdminKeyRow.key_id == key_id,
                                      AdminKeyRow.revoked_at.is_(None))
                               .values(revoked_at=now),
                               execution_options={"synchronize_session": False})
            return bool(getattr(result, "rowcount", 0) == 1)

    def is_live(self, key_id: str) -> bool:
        with self.store.session() as s:
            row = s.get(AdminKeyRow, key_id)
            return row is not None and row.revoked_at is None

    def any_live(self) -> bool:
        with self.store.session() as s:
            return s.scalars(select(AdminKeyRow.key_id)
                             .where(AdminKeyRow.revoked_at.is_(None))).first() is not None


def write_secret_file(path: Path, text: str) -> None:
    """Write `text` to `path`, mode 0600 from its first byte (replacing any old file)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")
    tmp.replace(path)


def ensure_admin_key(keys: AdminKeys, state_path: Path, now: float) -> Path | None:
    """With no live admin key, make one and write it to `admin.key` (0600); the path or None."""
    if keys.any_live():
        return None
    _, plaintext = keys.create("first", now)
    path = state_path / ADMIN_KEY_FILE
    write_secret_file(path, plaintext)
    return path


def read_admin_key(path: Path) -> str:
    """An admin key from a file (its first non-empty line)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CoordinatorError(f"cannot read the admin key file {path}: {exc.strerror}") from None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    raise CoordinatorError(f"the admin key file {path} is empty")
