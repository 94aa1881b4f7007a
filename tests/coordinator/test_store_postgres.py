"""The store contract (test_store.py, test_store_keys.py, test_store_usage.py) again,
on a real PostgreSQL started for this module.

The server is the `postgres` fixture (tests/conftest.py): tests/cluster/engines.py's
PostgresServer (initdb in a temporary directory, `pg_ctl start` on a free port of
127.0.0.1, as the `postgres` user through `runuser` when we are root; skipped with the
reason when initdb, pg_ctl, psycopg or a way to drop root is missing); one fresh
database per test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import test_store
import test_store_keys
import test_store_usage

from coordinator.store import Store
from tests.cluster.engines import PostgresServer

Opener = Callable[[], Store]

_SKIP_IN_CONTRACT = {
    "test_a_sqlite_store_runs_in_wal_mode_with_a_busy_timeout",  # SQLite only by design
    "test_a_sqlite_ledger_from_before_the_route_column_gets_it",
}


@pytest.fixture
def open_store(postgres: PostgresServer) -> Iterator[Opener]:
    """Like test_store's fixture, but every test gets its own fresh PostgreSQL database."""
    url = postgres.fresh_database()
    opened: list[Store] = []

    def opener() -> Store:
        opened.append(Store(url))
        return opened[-1]

    yield opener
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Opener) -> Store:
    return open_store()


def test_the_store_really_runs_on_postgresql(store: Store) -> None:
    assert store.engine.dialect.name == "postgresql"
    with store.engine.connect() as conn:
        from sqlalchemy import text

        assert "PostgreSQL" in str(conn.execute(text("select version()")).scalar())


def _contract() -> dict[str, Any]:
    return {
        name: test
        for contract in (test_store, test_store_keys, test_store_usage)
        for name, test in vars(contract).items()
        if name.startswith("test_") and callable(test) and name not in _SKIP_IN_CONTRACT
    }


globals().update(_contract())
