"""The usage ledger: one row per request, and the queries summed in the database."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, case, delete, func, insert, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from coordinator.errors import CoordinatorError
from coordinator.ledger_journal import MARK_PREFIX, Row, journaled
from coordinator.store.core import StoreCore
from coordinator.store.ledger_totals import with_rows
from coordinator.store.records import UsageGroup, UsageRecord, UsageTotal
from coordinator.store.schema import GenerationRow, UsageRow
from coordinator.store.sqlite_append import SqliteAppender

_LEDGER = cast("Table", UsageRow.__table__)  # Core inserts: no unit of work per row
_KEYED = UsageRow.ingest_key.is_not(None)  # the partial unique index's WHERE (ledger_index.py)


class LedgerStore(StoreCore):
    """The usage ledger: append, idempotent ingest, rows and grouped totals."""

    def record_usage(self, record: UsageRecord) -> None:
        """Append one row; client-chosen strings (request id, model) are cut to fit columns."""
        self.record_usages([record])

    ledger_barrier: Callable[[], None] | None = None
    """Called before the ledger is read (`usage_rows`, `usage_totals`, `spend_by_key`): the
    server's waits until every row it journaled is committed (read-your-writes)."""

    def record_usages(self, records: list[UsageRecord],
                      marks: Mapping[str, int] | None = None) -> None:
        """Append rows in one transaction: all or none (the ledger spool's replay, the ledger
        writer's group commit). One Core INSERT of many rows on a connection: the ORM's unit of
        work and session cost more than the insert itself on the request path. `marks`: ledger
        journals' marks (journal id -> last seq stored) set in the same transaction."""
        if not records and not marks:
            return
        if self.engine.dialect.name == "sqlite":  # the request path's store: no Core execute
            self._sqlite_appender().append([tuple(_usage_values(r).values()) for r in records],
                                           _mark_rows(marks))
            return
        with self._immediate.begin() as conn:  # as `_write`: one transaction
            if records:
                conn.execute(insert(_LEDGER), [_usage_values(r) for r in records])
            for name, value in _mark_rows(marks):
                conn.execute(postgresql_insert(GenerationRow).values(name=name, value=value)
                             .on_conflict_do_update(index_elements=["name"],
                                                    set_={"value": value}))

    def record_rows(self, rows: Sequence[Mapping[str, Any]], marks: Mapping[str, int]) -> None:
        """`record_usages` of rows that carry their ``created_at`` (journaled rows), with
        their journal's mark; SQLite straight from the dicts (`usage_tuple`)."""
        if self.engine.dialect.name == "sqlite":
            self._sqlite_appender().append(
                [usage_tuple(row, row["created_at"]) for row in rows], _mark_rows(marks))
            return
        self.record_usages([UsageRecord(**row) for row in rows], marks)

    def journal_mark(self, journal_id: str) -> int:
        """The last seq of ledger journal `journal_id` the store holds (0: none)."""
        return self.generation(MARK_PREFIX + journal_id)

    def forget_journal_mark(self, journal_id: str) -> None:
        with self._write() as s:
            s.execute(delete(GenerationRow).where(GenerationRow.name == MARK_PREFIX + journal_id))

    def _sqlite_appender(self) -> SqliteAppender:
        if self._appender is None:
            self._appender = SqliteAppender(self.engine, _LEDGER.name, _COLUMNS)
        return self._appender

    _appender: SqliteAppender | None = None

    def record_usages_now(self, records: list[UsageRecord]) -> bool:
        """`record_usages` without waiting (SQLite only): False, nothing stored, when
        another connection holds the write lock or the database is not SQLite."""
        if self.engine.dialect.name != "sqlite":
            return False
        if self._appender is None:
            self._appender = SqliteAppender(self.engine, _LEDGER.name, _COLUMNS)
        return self._appender.try_append([tuple(_usage_values(r).values()) for r in records])

    def record_rows_now(self, rows: Sequence[Mapping[str, Any]], created_at: float) -> bool:
        """`record_usages_now` of ``UsageRecord(**row, created_at=created_at)`` for each of
        `rows`, without building the records (the request path's one row: `usage_tuple`)."""
        if self.engine.dialect.name != "sqlite":
            return False
        if self._appender is None:
            self._appender = SqliteAppender(self.engine, _LEDGER.name, _COLUMNS)
        return self._appender.try_append([usage_tuple(row, created_at) for row in rows])

    def ledger_checkpoint(self) -> None:
        """Fold SQLite's write-ahead log into the database (blocking; a thread's job)."""
        if self._appender is not None:
            self._appender.checkpoint()

    def _barrier(self) -> None:
        if self.ledger_barrier is not None:
            self.ledger_barrier()

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()
        super().close()


    def ingest_usage(self, records: list[UsageRecord]) -> list[UsageRecord]:
        """Append rows that carry an `ingest_key`, skipping keys the ledger already holds
        (a node sending its journal again); returns the rows that were new. One transaction."""
        dialect = self.engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise CoordinatorError(f"ingest needs SQLite or PostgreSQL, not {dialect}")
        new: list[UsageRecord] = []
        with self._write() as s:
            for r in records:
                if r.ingest_key is None:
                    raise CoordinatorError("an ingested usage row needs its ingest_key")
                values = dict(
                    request_id=r.request_id[:128], key_id=r.key_id, node_did=r.node_did,
                    upstream=None, model=r.model[:255], endpoint=r.endpoint[:64],
                    route=r.route and r.route[:200], prompt_tokens=r.prompt_tokens,
                    completion_tokens=r.completion_tokens, latency_ms=r.latency_ms,
                    outcome=r.outcome[:64], cost=r.cost, created_at=r.created_at,
                    **_energy_values(r),
                )
                stmt = (
                    sqlite_insert(UsageRow).values(**values)
                    .on_conflict_do_nothing(index_elements=["ingest_key"], index_where=_KEYED)
                    .returning(UsageRow.id)
                    if dialect == "sqlite" else
                    postgresql_insert(UsageRow).values(**values)
                    .on_conflict_do_nothing(index_elements=["ingest_key"], index_where=_KEYED)
                    .returning(UsageRow.id)
                )
                if s.execute(stmt).first() is not None:  # None: the key was there already
                    new.append(r)
        return new

    def usage_rows(self, since: float | None = None) -> list[UsageRecord]:
        self._barrier()
        query = select(UsageRow).order_by(UsageRow.created_at, UsageRow.id)
        if since is not None:
            query = query.where(UsageRow.created_at >= since)
        with self._read() as s:
            return [_usage_record(r) for r in s.scalars(query)]

    def usage_rows_durable(self, *journal_dirs: Path) -> list[UsageRecord]:
        """Every row the coordinators (replicas) have answered for, from another process:
        the store's rows and those still only in their ledger journals (read first; the
        rows and the journals' marks then in one snapshot, so none is counted twice)."""
        journal = _journaled(journal_dirs)
        query = select(UsageRow).order_by(UsageRow.created_at, UsageRow.id)
        with self._snapshot() as s:
            rows = [_usage_record(r) for r in s.scalars(query)]
            return rows + self._journal_only(s, journal)

    def _journal_only(self, s: Session, journal: list[tuple[str, int, Row]]
                      ) -> list[UsageRecord]:
        """The journal records past their journal's mark in `s`'s snapshot: not stored."""
        marks = {jid: self.generation_in(s, MARK_PREFIX + jid) for jid, _, _ in journal}
        return [UsageRecord(**row) for jid, seq, row in journal if seq > marks[jid]]

    def usage_totals(self, by: UsageGroup, since: float | None = None,
                     journals: Sequence[Path] = ()) -> list[UsageTotal]:
        """The ledger summed per key, node (or upstream) or model, in the database. From
        another process (the local admin CLI), `journals` are the ledger journal directories
        whose rows not yet stored are added, each once (as `usage_rows_durable`)."""
        self._barrier()
        journal = _journaled(journals)
        column = {
            "key": func.coalesce(UsageRow.key_id, "-"),
            "node": func.coalesce(UsageRow.node_did, UsageRow.upstream, "-"),
            "model": UsageRow.model,
        }[by]
        query = select(
            column,
            func.count(UsageRow.id),
            func.sum(case((UsageRow.outcome == "ok", 1), else_=0)),
            func.sum(UsageRow.prompt_tokens),
            func.sum(UsageRow.completion_tokens),
            func.avg(UsageRow.latency_ms),
            func.sum(UsageRow.cost),
            func.sum(UsageRow.joules),
            func.sum(case((UsageRow.joules.is_not(None),
                           UsageRow.prompt_tokens + UsageRow.completion_tokens), else_=0)),
            func.sum(UsageRow.energy_cost),
        ).group_by(column).order_by(column)
        if since is not None:
            query = query.where(UsageRow.created_at >= since)
        with self._snapshot() as s:
            totals = [
                UsageTotal(str(g), int(n), int(ok or 0), int(p or 0), int(c or 0),
                           float(lat or 0.0), float(cost or 0.0),
                           None if j is None else float(j), int(jt or 0),
                           None if ec is None else float(ec))
                for g, n, ok, p, c, lat, cost, j, jt, ec in s.execute(query)
            ]
            unstored = self._journal_only(s, journal) if journal else []
        return with_rows(totals, [r for r in unstored if since is None or r.created_at >= since],
                         by)

    def spend_by_key(self, day_start: float, month_start: float) -> dict[str, tuple[float, float]]:
        """key id -> (cost since `day_start`, cost since `month_start`), one grouped query."""
        self._barrier()
        start = min(day_start, month_start)
        today = func.sum(case((UsageRow.created_at >= day_start, UsageRow.cost), else_=0.0))
        month = func.sum(case((UsageRow.created_at >= month_start, UsageRow.cost), else_=0.0))
        query = (select(UsageRow.key_id, today, month)
                 .where(UsageRow.created_at >= start, UsageRow.key_id.is_not(None))
                 .group_by(UsageRow.key_id))
        with self._read() as s:
            return {str(k): (float(d or 0.0), float(m or 0.0)) for k, d, m in s.execute(query)}



def _journaled(directories: Sequence[Path]) -> list[tuple[str, int, Row]]:
    """Every record of the ledger journals in `directories` (journal id, seq, row)."""
    return [record for directory in directories for record in journaled(directory)]


def _mark_rows(marks: Mapping[str, int] | None) -> list[tuple[str, int]]:
    return [(MARK_PREFIX + jid, seq) for jid, seq in (marks or {}).items()]


def _energy_values(record: UsageRecord) -> dict[str, Any]:
    return {"joules": record.joules, "energy_estimated": record.energy_estimated,
            "energy_cost": record.energy_cost, "ingest_key": record.ingest_key}



def _usage_record(row: UsageRow) -> UsageRecord:
    return UsageRecord(
        request_id=row.request_id, key_id=row.key_id, node_did=row.node_did, model=row.model,
        endpoint=row.endpoint, prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens, latency_ms=row.latency_ms,
        outcome=row.outcome, created_at=row.created_at, upstream=row.upstream, cost=row.cost,
        route=row.route, status=row.status, error=row.error, joules=row.joules,
        energy_estimated=row.energy_estimated, energy_cost=row.energy_cost,
        ingest_key=row.ingest_key,
    )


def _usage_values(record: UsageRecord) -> dict[str, Any]:
    return dict(
        request_id=record.request_id[:128], key_id=record.key_id,
        node_did=record.node_did, upstream=record.upstream and record.upstream[:200],
        model=record.model[:255], endpoint=record.endpoint[:64],
        route=record.route and record.route[:200],
        prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
        latency_ms=record.latency_ms, outcome=record.outcome[:64], cost=record.cost,
        created_at=record.created_at, status=record.status,
        error=record.error and record.error[:64], **_energy_values(record),
    )


_COLUMNS = tuple(_usage_values(UsageRecord(
    request_id="", key_id=None, node_did=None, model="", endpoint="", prompt_tokens=0,
    completion_tokens=0, latency_ms=0.0, outcome="", created_at=0.0)))
"""The ledger's columns in `_usage_values` order (the appender's INSERT)."""


def usage_tuple(row: Mapping[str, Any], created_at: float) -> tuple[Any, ...]:
    """``tuple(_usage_values(UsageRecord(**row, created_at=created_at)).values())``, the
    same values in `_COLUMNS` order, read from the row's dict directly: the record and the
    dict in between cost more than the insert's Python side on the request path. A row
    missing a field the record requires raises KeyError (the record: TypeError)."""
    get = row.get
    upstream, route, error = get("upstream"), get("route"), get("error")
    return (
        row["request_id"][:128], row["key_id"], row["node_did"],
        upstream and upstream[:200], row["model"][:255], row["endpoint"][:64],
        route and route[:200], row["prompt_tokens"], row["completion_tokens"],
        row["latency_ms"], row["outcome"][:64], get("cost", 0.0), created_at,
        get("status"), error and error[:64], get("joules"), get("energy_estimated"),
        get("energy_cost"), get("ingest_key"),
    )
