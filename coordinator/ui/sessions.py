"""The web pane's login sessions: a random id in an HttpOnly SameSite=Strict cookie.

Kept in the store (table ``admin_sessions``, only a SHA-256 of each id), so a
session opened through one replica works on every replica behind the same
load balancer, survives a restart, and a sign-out ends it everywhere. Each is
good for `SESSION_TTL_S` from login; at most `MAX_SESSIONS` live at once (the
oldest login goes first). A session is only as good as the admin key that
opened it: the pane checks that key is still live on every request.

The methods do database I/O: call them off the event loop (``asyncio.to_thread``).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable

from sqlalchemy import String, delete, func, select
from sqlalchemy.orm import Mapped, mapped_column

from coordinator.store import Base, Store

SESSION_COOKIE = "meshgate_admin"
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 1000


class SessionRow(Base):
    __tablename__ = "admin_sessions"
    session_hash: Mapped[bytes] = mapped_column(primary_key=True)
    key_id: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[float] = mapped_column(index=True)


def _hash(session: str) -> bytes:
    return hashlib.sha256(session.encode()).digest()


class Sessions:
    """The pane's sessions in one store (the table is made on first use)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        immediate = store.engine.execution_options(meshgate_begin="IMMEDIATE")
        with immediate.begin() as conn:
            Base.metadata.create_all(conn, tables=[SessionRow.__table__])  # type: ignore[list-item]

    def open(self, admin_key_id: str) -> str:
        session = secrets.token_urlsafe(32)
        now = self._clock()
        with self._store.session(write=True) as s:
            s.execute(delete(SessionRow).where(SessionRow.expires_at <= now))
            s.add(SessionRow(session_hash=_hash(session), key_id=admin_key_id,
                             expires_at=now + SESSION_TTL_S))
            s.flush()
            extra = (s.scalar(select(func.count()).select_from(SessionRow)) or 0) - MAX_SESSIONS
            if extra > 0:
                oldest = list(s.scalars(select(SessionRow.session_hash)
                                        .order_by(SessionRow.expires_at).limit(extra)))
                s.execute(delete(SessionRow).where(SessionRow.session_hash.in_(oldest)))
        return session

    def get(self, session: str) -> str | None:
        """The admin key id of a live session, or None."""
        with self._store.session() as s:
            row = s.get(SessionRow, _hash(session))
            if row is None or row.expires_at <= self._clock():
                return None
            return row.key_id

    def close(self, session: str) -> None:
        with self._store.session(write=True) as s:
            s.execute(delete(SessionRow).where(SessionRow.session_hash == _hash(session)))
