"""Appending rows to one SQLite table on a connection of its own, without SQLAlchemy.

The ledger gets a row per request, written before the answer's last byte (issue 9). On
SQLite, SQLAlchemy Core's execute (pool checkout, compiled-statement cache, the BEGIN
event, result objects) cost 4-8 times the insert itself (measured 350-560 us against
68-76 us a row on a loaded box); this keeps one DBAPI connection from the engine's pool
(so it has the engine's pragmas: WAL, synchronous=NORMAL, busy_timeout) and runs one
prepared INSERT with ``executemany`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT``. All rows
or none, like the Core path; a lock keeps it to one thread at a time.

`try_append` is the same on a second connection that never waits for the write lock,
so the event loop can store a row itself when nobody else is writing (no thread hand-off
each way) and leave it to the ledger writer's thread when someone is.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine

MARKS = "generations"
"""The table of named counters (store/schema.py, GenerationRow) that holds journal marks."""


class SqliteAppender:
    def __init__(self, engine: Engine, table: str, columns: Sequence[str]) -> None:
        self._engine = engine
        # names from our own schema (ledger.py), never from a request
        self._sql = (f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608
                     f"VALUES ({', '.join('?' * len(columns))})")
        self._mark_sql = (f"INSERT INTO {MARKS} (name, value) VALUES (?, ?) "  # noqa: S608
                          "ON CONFLICT (name) DO UPDATE SET value = excluded.value")
        self._lock = threading.Lock()
        self._conn: Any = None
        self._quick: Any = None  # the event loop's own (try_append)
        self._quick_cursor: Any = None

    def append(self, rows: list[tuple[Any, ...]],
               marks: Sequence[tuple[str, int]] = ()) -> None:
        """Insert `rows` in one transaction, with `marks` (name, value) set in the
        ``generations`` table in the same one (a ledger journal's mark); raises the
        driver's error (nothing stored)."""
        with self._lock:
            cursor = self._writer().cursor()
            try:
                cursor.execute("BEGIN IMMEDIATE")
                self._insert(cursor, rows, marks)
            finally:
                cursor.close()

    def _writer(self) -> Any:
        """The thread side's connection (made on first use); hold `_lock`."""
        if self._conn is None:
            self._conn = self._engine.raw_connection()
        return self._conn

    def _insert(self, cursor: Any, rows: list[tuple[Any, ...]],
                marks: Sequence[tuple[str, int]] = ()) -> None:
        """Inside the caller's BEGIN: insert `rows` (and `marks`) and commit, or roll back
        and raise."""
        try:
            cursor.executemany(self._sql, rows)
            if marks:
                cursor.executemany(self._mark_sql, marks)
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise

    def try_append(self, rows: list[tuple[Any, ...]]) -> bool:
        """`append` if it cannot wait: False (nothing stored) when another writer holds
        the database's write lock. For the event loop: its connection has no busy
        timeout and no automatic WAL checkpoint (a checkpoint copies pages and fsyncs;
        `checkpoint` does it off the loop)."""
        cursor = self._quick_cursor
        if cursor is None:
            self._quick = self._engine.raw_connection()
            cursor = self._quick_cursor = self._quick.cursor()  # kept: one per call cost more
            cursor.execute("PRAGMA busy_timeout=0")
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        try:
            cursor.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return False
            raise
        self._insert(cursor, rows)
        return True

    def checkpoint(self) -> None:
        """Move the write-ahead log into the database (PASSIVE: waits for nobody)."""
        with self._lock:
            cursor = self._writer().cursor()
            try:
                cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                cursor.close()

    def close(self) -> None:
        with self._lock:
            if self._quick_cursor is not None:
                self._quick_cursor.close()
            for conn in (self._conn, self._quick):
                if conn is not None:
                    conn.close()  # back to the pool, which the engine then disposes
            self._conn = self._quick = self._quick_cursor = None
