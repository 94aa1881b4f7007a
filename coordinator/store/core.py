"""The store's engine and transactions: SQLite pragmas, the write lock, generations."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, create_engine, event, update
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.dml import Update

from coordinator.engines import database_url
from coordinator.store.ledger_index import migrate as migrate_ingest_index
from coordinator.store.schema import Base, GenerationRow, _add_missing_columns, lock_schema

KEY_PREFIX = "mg_"
SECRET_LEN = 32
BUSY_TIMEOUT_MS = 10_000
_BEGIN_OPTION = "meshgate_begin"
MAX_TOKEN_USES = 1_000_000
KEYS_GENERATION = "api_keys"
"""Bumped by every key revoke and rotate: a server that sees it move drops its key cache."""


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _on_sqlite_connect(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # Let SQLAlchemy, not pysqlite, emit BEGIN, so that writers can ask for IMMEDIATE.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_MS)}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _on_sqlite_begin(conn: Any) -> None:
    immediate = conn.get_execution_options().get(_BEGIN_OPTION) == "IMMEDIATE"
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _rowcount(session: Session, stmt: Update) -> int:
    result = session.execute(stmt, execution_options={"synchronize_session": False})
    return cast("CursorResult[Any]", result).rowcount


class StoreCore:
    """The engine, its sessions and the change counters; the per-job parts build on it."""

    def __init__(self, url: str) -> None:
        self.url = url
        url = database_url(url)  # a missing driver: one line naming the extra
        # a server restarted under us: test pooled connections before use, not on a request
        self.engine: Engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _on_sqlite_connect)
            event.listen(self.engine, "begin", _on_sqlite_begin)
        immediate = self.engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
        with immediate.begin() as conn:  # two first starts must not both create a table
            lock_schema(conn)
            Base.metadata.create_all(conn)
            _add_missing_columns(conn)
            migrate_ingest_index(conn)  # the ledger's ingest_key index made partial
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(immediate, expire_on_commit=False)
        self._immediate = immediate  # Core writes on the request path (no ORM session)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One transaction that holds the write lock from its first statement."""
        with self._writer.begin() as session:
            yield session

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reader() as session:
            yield session

    @contextmanager
    def _snapshot(self) -> Iterator[Session]:
        """A read whose statements all see one snapshot: SQLite's read transaction is one
        already; PostgreSQL's default (READ COMMITTED) takes one per statement, so REPEATABLE
        READ (the ledger's rows and its journal marks must agree: `usage_rows_durable`)."""
        with self._reader() as session:
            if self.engine.dialect.name == "postgresql":
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            yield session

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """A session for modules that keep their own tables here (`admin_keys.py`);
        `write`: one transaction holding the write lock, committed at the end."""
        with self._write() if write else self._read() as session:
            yield session

    def generation(self, name: str) -> int:
        """The change counter `name` (0 if nothing ever bumped it); one primary-key read."""
        with self._read() as s:
            return self.generation_in(s, name)

    @staticmethod
    def generation_in(session: Session, name: str) -> int:
        """`generation` inside the caller's read (one snapshot with its other reads)."""
        row = session.get(GenerationRow, name)
        return row.value if row is not None else 0


def _bump(session: Session, name: str) -> None:
    """Count one more change of `name`, inside the caller's write transaction."""
    bumped = _rowcount(session, update(GenerationRow).where(GenerationRow.name == name)
                       .values(value=GenerationRow.value + 1))
    if bumped == 0:
        session.add(GenerationRow(name=name, value=1))

