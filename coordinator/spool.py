"""Ledger rows survive a database outage: written to a local file, replayed later.

A replica on PostgreSQL writes each ledger row to the database; when that fails (the
server is down, restarting, unreachable) the row is appended to `ledger-spool.jsonl` in
the replica's state directory (flushed and fsynced) and the outage is logged once.
While the spool holds rows, new rows go behind them (order kept, and no request waits
on a database that is down); a background loop replays the spool every `REPLAY_S` in
one transaction (all rows or none, so a failed replay duplicates nothing) and empties
it. A replica that stops or crashes with rows spooled replays them on its next start.

Rows from the ledger journal (ledger_journal.py) come with their journal's mark; spooled,
the mark follows them as a line of its own (``{"journal_marks": {...}}``, in the same
fsynced write), so a restart's journal replay skips rows the spool already holds, and the
spool's replay stores the marks with the rows.

What a client received and what the ledger holds only differ while the database is
down, by the rows in the spool. A request that needs the database while it is down (a
key not verified in the last seconds) gets a 503 in OpenAI's shape with Retry-After
(`database_unavailable`), not a bare 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from coordinator.store import Store, UsageRecord
from meshgate.openai import OpenAIError

log = logging.getLogger(__name__)

SPOOL_FILE = "ledger-spool.jsonl"
REPLAY_S = 1.0
_FIELDS = {f.name for f in dataclasses.fields(UsageRecord)}
MARKS = "journal_marks"
_MARK_LINE = '{"journal_marks":'


class LedgerSpool:
    def __init__(self, store: Store, state_dir: Path) -> None:
        self.store = store
        self.path = state_dir / SPOOL_FILE
        self._lock = threading.Lock()
        self.spooled = 0
        """rows written to the spool since start"""
        self.replayed = 0

    def pending(self) -> int:
        with self._lock:
            return self._count()

    def _count(self) -> int:
        try:
            with self.path.open("rb") as spool:
                return sum(1 for line in spool
                           if line.strip() and not line.startswith(_MARK_LINE.encode()))
        except FileNotFoundError:
            return 0

    def record(self, record: UsageRecord) -> None:
        """Write one row to the database, or to the spool (blocking; callers use a thread)."""
        self.record_many([record])

    def record_many(self, records: list[UsageRecord],
                    marks: Mapping[str, int] | None = None) -> None:
        """Write rows (and journal marks) to the database in one transaction, or all to the
        spool (blocking)."""
        with self._lock:
            if not self.path.exists():
                try:
                    self.store.record_usages(records, marks)
                    return
                except SQLAlchemyError as exc:
                    log.error("LEDGER: the database refused a row (%s); spooling rows to %s "
                              "and replaying them when it is back", _first_line(exc), self.path)
            self._append(records, marks)

    def marks(self) -> dict[str, int]:
        """The journal marks of the spooled rows (journal id -> last seq spooled)."""
        with self._lock:
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return {}
        return _marks(text.splitlines())

    def _append(self, records: list[UsageRecord], marks: Mapping[str, int] | None) -> None:
        text = "".join(json.dumps(dataclasses.asdict(r), separators=(",", ":")) + "\n"
                       for r in records)
        if marks:
            text += json.dumps({MARKS: dict(marks)}, separators=(",", ":")) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as spool:
            spool.write(text)
            spool.flush()
            os.fsync(spool.fileno())
        self.spooled += len(records)

    def replay(self) -> int:
        """Move every spooled row into the database in one transaction; how many moved.
        Raises SQLAlchemyError (rows stay spooled) while the database is still down."""
        with self._lock:
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return 0
            lines = [line for line in text.splitlines() if line.strip()]
            read = [_record(line) for line in lines if not line.startswith(_MARK_LINE)]
            records = [r for r in read if r is not None]
            marks = _marks(lines)
            if records or marks:
                self.store.record_usages(records, marks)
            self.path.unlink()
            self.replayed += len(records)
        log.warning("LEDGER: the database is back; %d spooled row(s) written", len(records))
        return len(records)

    async def run(self, period: float = REPLAY_S) -> None:
        """Until cancelled: replay the spool whenever it holds rows."""
        while True:
            if self.path.exists():
                with contextlib.suppress(SQLAlchemyError):
                    await asyncio.to_thread(self.replay)
            await asyncio.sleep(period)


def _marks(lines: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in lines:
        if line.startswith(_MARK_LINE):
            try:
                for jid, seq in json.loads(line)[MARKS].items():
                    out[str(jid)] = max(out.get(str(jid), 0), int(seq))
            except (ValueError, TypeError, AttributeError, KeyError):
                log.error("LEDGER: an unreadable spool line was skipped: %.200s", line)
    return out


def _record(line: str) -> UsageRecord | None:
    try:
        data: Any = json.loads(line)
        return UsageRecord(**{k: v for k, v in data.items() if k in _FIELDS})
    except (ValueError, TypeError, AttributeError):
        log.error("LEDGER: an unreadable spool line was skipped: %.200s", line)
        return None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


async def database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    """The API's answer when the store fails under a request: 503, retry in a second."""
    log.error("the database failed under a request: %s", _first_line(exc))
    error = OpenAIError(503, "the coordinator's database is unreachable; retry shortly",
                        code="database_unavailable", hop="coordinator")
    return JSONResponse(error.body(), status_code=503, headers={"Retry-After": "1"})


def answering_database_outages(app: FastAPI) -> FastAPI:
    """`app`, answering a store failure under any request with `database_unavailable`."""
    app.add_exception_handler(SQLAlchemyError, database_unavailable)
    return app
