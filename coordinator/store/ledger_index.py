"""The ledger's unique index on ``ingest_key``, partial: only rows that have one.

``ingest_key`` is set on rows a node uploads from its offline journal (ingest.py) and
NULL on every row the coordinator writes for a request. A plain unique index holds an
entry for each of those NULLs too: every request's row wrote a fourth b-tree (measured
on SQLite: 18.1 KB of WAL and ~35 us a row with it, 13.8 KB and ~25 us without). The
partial index ``WHERE ingest_key IS NOT NULL`` keeps the same guarantee for the keys
(`LedgerStore.ingest_usage` names it in its ``ON CONFLICT``) and nothing for the rest.

`migrate` brings a store of an earlier release to it, inside the schema transaction
(`StoreCore.__init__`), keeping every row and id:

- SQLite, a table created with the column ``UNIQUE`` (its index belongs to the table
  and cannot be dropped): the table is rebuilt (renamed, created anew, rows copied,
  the old one dropped), as SQLite's documented way to change a table's constraints;
- SQLite, the plain unique index an older migration added: dropped and made partial;
- PostgreSQL: the ``UNIQUE`` constraint or plain index dropped, the partial one made.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Index, Table, text

from coordinator.store.schema import UsageRow

NAME = "ix_usage_ledger_ingest_key"
WHERE = "ingest_key IS NOT NULL"
_TABLE: Table = UsageRow.__table__  # type: ignore[assignment]
_OLD = "usage_ledger_before_partial_index"


def ingest_index() -> Index:
    """The index as the table declares it (schema.py)."""
    return next(ix for ix in _TABLE.indexes if ix.name == NAME)


def migrate(conn: Any) -> None:
    """Make the ledger's ``ingest_key`` index the partial one (see the module doc)."""
    if conn.dialect.name == "sqlite":
        _sqlite(conn)
    elif conn.dialect.name == "postgresql":
        _postgresql(conn)


def _sqlite_indexes(conn: Any, table: str) -> list[tuple[str, str, bool, list[str]]]:
    """(name, origin: c made by CREATE INDEX, u by UNIQUE, pk; partial, columns)."""
    out = []
    for _, name, _, origin, partial in conn.exec_driver_sql(
            f"PRAGMA index_list('{table}')").all():
        columns = [row[2] for row in conn.exec_driver_sql(f"PRAGMA index_info('{name}')")]
        out.append((name, origin, bool(partial), columns))
    return out


def _sqlite(conn: Any) -> None:
    table = _TABLE.name
    on_key = [ix for ix in _sqlite_indexes(conn, table) if ix[3] == ["ingest_key"]]
    if any(origin != "c" for _, origin, _, _ in on_key):
        _rebuild_sqlite(conn)
        return
    for name, _, partial, _ in on_key:
        if not partial:
            conn.exec_driver_sql(f'DROP INDEX "{name}"')
    if not any(partial for _, _, partial, _ in on_key):
        ingest_index().create(conn)


def _rebuild_sqlite(conn: Any) -> None:
    table = _TABLE.name
    conn.exec_driver_sql(f'ALTER TABLE "{table}" RENAME TO "{_OLD}"')
    for name, origin, _, _ in _sqlite_indexes(conn, _OLD):
        if origin == "c":  # its names are the new table's: free them
            conn.exec_driver_sql(f'DROP INDEX "{name}"')
    _TABLE.create(conn)
    columns = ", ".join(f'"{c.name}"' for c in _TABLE.columns)
    conn.exec_driver_sql(f'INSERT INTO "{table}" ({columns}) '  # noqa: S608 - our names
                         f'SELECT {columns} FROM "{_OLD}" ORDER BY id')
    conn.exec_driver_sql(f'DROP TABLE "{_OLD}"')


def _postgresql(conn: Any) -> None:
    table = _TABLE.name
    constraints = conn.execute(text(
        "SELECT c.conname FROM pg_constraint c JOIN pg_attribute a"
        " ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)"
        " WHERE c.conrelid = CAST(:t AS regclass) AND c.contype = 'u'"
        " AND a.attname = 'ingest_key' AND cardinality(c.conkey) = 1"), {"t": table}).scalars()
    for name in list(constraints):
        conn.execute(text(f'ALTER TABLE "{table}" DROP CONSTRAINT "{name}"'))
    indexes = conn.execute(text(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
        " AND tablename = :t AND indexdef LIKE '%(ingest_key)%'"), {"t": table}).all()
    partial = False
    for name, definition in indexes:
        if " WHERE " in definition:
            partial = True
        else:
            conn.execute(text(f'DROP INDEX "{name}"'))
    if not partial:
        ingest_index().create(conn)
