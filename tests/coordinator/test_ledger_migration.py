"""A ledger of an earlier release opens, migrates its ``ingest_key`` index to the partial
one (store/ledger_index.py) and keeps every row, on SQLite and on a real PostgreSQL.

The earlier stores are made as those releases made them: `create_all` of the same table
with the column ``UNIQUE`` (the release before this one), and on SQLite also the plain
unique index an older migration added to a table from before the column."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, MetaData, UniqueConstraint, create_engine, text

from coordinator.store import Store, UsageRecord
from coordinator.store.ledger_index import NAME, WHERE
from coordinator.store.schema import Base, UsageRow
from tests.cluster.engines import PostgresServer


def row(i: int, key: str | None) -> UsageRecord:
    return UsageRecord(
        request_id=f"r{i}", key_id="k1", node_did="did:key:z6MkA", model="m",
        endpoint="chat/completions", prompt_tokens=i, completion_tokens=2 * i,
        latency_ms=1.5 * i, outcome="ok", created_at=100.0 + i, route="offline" if key else None,
        joules=0.25 * i, energy_estimated=bool(i % 2), energy_cost=0.01 * i, ingest_key=key)


def previous_release(engine: Engine) -> None:
    """The tables as the release before this one created them: ``ingest_key UNIQUE``."""
    old = MetaData()
    for table in Base.metadata.sorted_tables:
        copy = table.to_metadata(old)
        if table.name == UsageRow.__tablename__:
            for index in [ix for ix in copy.indexes if ix.name == NAME]:
                copy.indexes.discard(index)
            copy.append_constraint(UniqueConstraint("ingest_key"))
    old.create_all(engine)
    engine.dispose()


def fill(store: Store) -> list[UsageRecord]:
    """Rows the way that release wrote them: some ingested (keyed), most not."""
    plain = [row(i, None) for i in range(1, 4)]
    store.record_usages(plain)
    keyed = [row(i, f"key{i}") for i in range(4, 6)]
    assert store.ingest_usage(keyed) == keyed
    return plain + keyed


def rows_of(store: Store) -> list[tuple[object, ...]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT * FROM usage_ledger ORDER BY id"))]


def check_migrated(opened: Store, before: list[tuple[object, ...]], written: list[UsageRecord]
                   ) -> None:
    assert rows_of(opened) == before  # every row, every field, every id
    assert opened.usage_rows() == written
    # the keys still count once; rows without a key never collide
    assert opened.ingest_usage([row(4, "key4"), row(6, "key6")]) == [row(6, "key6")]
    opened.record_usages([row(7, None), row(7, None)])
    ids = [r[0] for r in rows_of(opened)]
    assert len(ids) == len(before) + 3
    assert ids == sorted(set(ids))


def sqlite_indexes(path: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(path) as conn:
        return [(name, origin, partial) for _, name, _, origin, partial in
                conn.execute("PRAGMA index_list('usage_ledger')")]


def test_a_sqlite_ledger_with_the_plain_unique_index_migrates_and_keeps_every_row(
        tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    first = Store(url)
    written = fill(first)
    first.close()
    with sqlite3.connect(path) as conn:  # as an older migration left a table from before
        conn.execute(f"DROP INDEX {NAME}")  # the column: a unique index on every row
        conn.execute(f"CREATE UNIQUE INDEX {NAME} ON usage_ledger (ingest_key)")
        before = conn.execute("SELECT * FROM usage_ledger ORDER BY id").fetchall()
    assert (NAME, "c", 0) in sqlite_indexes(path)
    opened = Store(url)
    try:
        assert (NAME, "c", 1) in sqlite_indexes(path)
        check_migrated(opened, before, written)
    finally:
        opened.close()


def test_a_sqlite_ledger_with_a_unique_column_is_rebuilt_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    previous_release(create_engine(url))
    with sqlite3.connect(path) as conn:  # rows written by that release, ids with a gap
        for i, key in ((1, None), (2, None), (5, "key5"), (9, None)):
            r = row(i, key)
            conn.execute(
                "INSERT INTO usage_ledger (id, request_id, key_id, node_did, model, endpoint,"
                " prompt_tokens, completion_tokens, latency_ms, outcome, cost, created_at,"
                " ingest_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0.0, ?, ?)",
                (i, r.request_id, r.key_id, r.node_did, r.model, r.endpoint, r.prompt_tokens,
                 r.completion_tokens, r.latency_ms, r.outcome, r.created_at, key))
    assert any(origin == "u" for _, origin, _ in sqlite_indexes(path))
    with sqlite3.connect(path) as conn:
        before = conn.execute("SELECT * FROM usage_ledger ORDER BY id").fetchall()
    store = Store(url)
    try:
        assert rows_of(store) == before
        assert sorted(sqlite_indexes(path)) == sorted([
            (NAME, "c", 1), ("ix_usage_ledger_created_at", "c", 0),
            ("ix_usage_ledger_request_id", "c", 0)])
        with sqlite3.connect(path) as conn:
            sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?",
                               (NAME,)).fetchone()[0]
            tables = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert WHERE in sql
        assert "usage_ledger_before_partial_index" not in tables
        assert store.ingest_usage([row(5, "key5"), row(6, "key6")]) == [row(6, "key6")]
        store.record_usage(row(10, None))
        assert [r[0] for r in rows_of(store)] == [1, 2, 5, 9, 10, 11]
    finally:
        store.close()


def test_a_postgresql_ledger_of_the_previous_release_migrates_and_keeps_every_row(
        postgres: PostgresServer) -> None:
    url = postgres.fresh_database()
    previous_release(create_engine(url.replace("postgresql://", "postgresql+psycopg://")))
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))

    def definitions() -> list[str]:
        with engine.connect() as conn:
            return list(conn.execute(text(
                "SELECT indexdef FROM pg_indexes WHERE tablename = 'usage_ledger'"
                " AND indexdef LIKE '%(ingest_key)%'")).scalars())

    def unique_constraints() -> list[str]:
        with engine.connect() as conn:
            return list(conn.execute(text(
                "SELECT conname FROM pg_constraint WHERE contype = 'u'"
                " AND conrelid = 'usage_ledger'::regclass")).scalars())

    assert unique_constraints() == ["usage_ledger_ingest_key_key"]
    opened: list[Store] = []
    store: Callable[[], Store] = lambda: opened.append(Store(url)) or opened[-1]  # noqa: E731
    try:
        # the previous release's rows: written through its constraint (put back here)
        first = store()
        with first.engine.begin() as conn:
            conn.execute(text(f"DROP INDEX {NAME}"))
            conn.execute(text("ALTER TABLE usage_ledger ADD CONSTRAINT"
                              " usage_ledger_ingest_key_key UNIQUE (ingest_key)"))
        written = fill(first)
        before = rows_of(first)
        first.close()
        migrated = store()
        assert unique_constraints() == []
        assert [WHERE in d.replace("(", "").replace(")", "") for d in definitions()] == [True]
        check_migrated(migrated, before, written)
    finally:
        for s in opened:
            s.close()
        engine.dispose()
