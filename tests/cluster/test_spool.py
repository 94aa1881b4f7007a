"""The ledger while PostgreSQL is down: rows spooled on disk, written when it is back."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import pytest
from sqlalchemy.exc import SQLAlchemyError

from coordinator.ledger_journal import JOURNAL_DIR, LedgerJournal
from coordinator.server import _ledger_journal
from coordinator.spool import LedgerSpool
from coordinator.store import Store, UsageRecord
from tests.cluster.engines import PostgresServer


def _row(n: int) -> UsageRecord:
    return UsageRecord(request_id=f"req_{n}", key_id="k", node_did="did:key:z6Mk", model="m",
                       endpoint="chat/completions", prompt_tokens=n, completion_tokens=1,
                       latency_ms=1.0, outcome="ok", created_at=1000.0 + n)


def test_rows_spool_while_postgres_is_down_and_nothing_is_lost(
    postgres: PostgresServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(postgres.url)
    spool = LedgerSpool(store, tmp_path)
    try:
        spool.record(_row(0))
        postgres.stop()
        with caplog.at_level(logging.ERROR, logger="coordinator.spool"):
            for n in range(1, 4):
                spool.record(_row(n))
        assert [r.getMessage()[:7] for r in caplog.records] == ["LEDGER:"]  # once
        assert spool.pending() == 3
        assert (tmp_path / "ledger-spool.jsonl").stat().st_mode & 0o077 == 0
        with pytest.raises(SQLAlchemyError):
            spool.replay()  # still down: the rows stay spooled
        assert spool.pending() == 3
        postgres.start()
        spool.record(_row(4))  # behind the spooled rows, not before them
        assert spool.replay() == 4
        assert spool.pending() == 0
        rows = store.usage_rows()
        assert [r.request_id for r in rows] == [f"req_{n}" for n in range(5)]
        assert rows[2] == _row(2)
        spool.record(_row(5))  # back to the database directly
        assert spool.pending() == 0
        assert len(store.usage_rows()) == 6
    finally:
        store.close()


async def test_a_spool_left_by_a_stopped_replica_is_replayed_at_start(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    store = Store(postgres.url)
    try:
        before = len(store.usage_rows())
        postgres.stop()
        LedgerSpool(store, tmp_path).record(_row(10))  # then the replica "stops"
        postgres.start()
        restarted = LedgerSpool(Store(postgres.url), tmp_path)
        assert restarted.pending() == 1
        assert await asyncio.to_thread(restarted.replay) == 1  # what run() does first
        assert len(store.usage_rows()) == before + 1
        restarted.store.close()
    finally:
        store.close()


def test_a_request_that_needs_the_database_while_it_is_down_gets_a_clear_503(
    postgres: PostgresServer,
) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from coordinator.spool import answering_database_outages

    store = Store(postgres.url)
    app = FastAPI()

    @app.get("/check")
    def check() -> dict[str, bool]:
        return {"known": store.verify_key("mg_abc_def") is not None}

    client = TestClient(answering_database_outages(app))
    try:
        assert client.get("/check").json() == {"known": False}
        postgres.stop()
        try:
            reply = client.get("/check")
        finally:
            postgres.start()
        assert reply.status_code == 503
        assert reply.headers["retry-after"] == "1"
        assert reply.json()["error"]["code"] == "database_unavailable"
        assert client.get("/check").status_code == 200  # back (pre-ping: no stale error)
    finally:
        store.close()


def test_journaled_rows_spooled_in_an_outage_are_replayed_once(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """The ledger journal on PostgreSQL: a batch and its journal mark commit together; in
    an outage both go to the spool. A replica that dies before truncating its journal
    replays neither the committed nor the spooled rows from it a second time."""
    store = Store(postgres.url)
    directory = tmp_path / JOURNAL_DIR
    try:
        before = len(store.usage_rows())
        journal = LedgerJournal(directory)
        rows = [dataclasses.asdict(_row(n)) | {"request_id": f"j_{n}"} for n in range(6)]
        for row in rows:
            journal.append(row)
        spool = LedgerSpool(store, tmp_path)
        spool.record_many([UsageRecord(**r) for r in rows[:2]], {journal.id: 2})
        assert store.journal_mark(journal.id) == 2  # in the rows' transaction
        postgres.stop()
        spool.record_many([UsageRecord(**r) for r in rows[2:4]], {journal.id: 4})
        postgres.start()
        assert spool.pending() == 2
        assert spool.marks() == {journal.id: 4}
        # the process dies here: rows 5 and 6 only journaled, the journal not truncated
        restarted = Store(postgres.url)
        try:
            fresh = _ledger_journal(directory, restarted, LedgerSpool(restarted, tmp_path))
            assert fresh is not None
            assert fresh.id != journal.id
            fresh.close()
            assert not list(directory.glob("*.lj"))  # the old run's files replayed, gone
            # rows 5 and 6 went behind the spooled ones (order kept while it holds rows)
            assert LedgerSpool(restarted, tmp_path).replay() == 4
            ids = [r.request_id for r in restarted.usage_rows()]
            assert sorted(i for i in ids if i.startswith("j_")) == [f"j_{n}" for n in range(6)]
            assert len(ids) == before + 6  # each once
            assert restarted.journal_mark(journal.id) == 6  # the spool's lines carried it
        finally:
            restarted.close()
    finally:
        store.close()
