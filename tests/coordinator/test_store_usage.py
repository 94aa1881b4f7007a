"""The store's contract for usage rows and durability, on every backend."""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from sqlalchemy import select, text

from coordinator.errors import CoordinatorError
from coordinator.ledger_journal import LedgerJournal
from coordinator.store import (
    Store,
    UsageGroup,
    UsageRecord,
    UsageRow,
    UsageTotal,
)
from tests.coordinator.store_harness import (
    DID_A,
    NOW,
    Opener,
    enroll,
    sqlite_url,
    usage,
)

# ----------------------------------------------------------------------------- usage


def test_usage_accepts_the_row_shape_the_server_records(store: Store) -> None:
    row = {"request_id": "r1", "key_id": "k1", "node_did": DID_A, "model": "m",
           "endpoint": "/v1/completions", "prompt_tokens": 3, "completion_tokens": 4,
           "latency_ms": 12.5, "outcome": "ok"}
    store.record_usage(UsageRecord(**row, created_at=NOW))  # type: ignore[arg-type]
    [back] = store.usage_rows()
    assert back == UsageRecord(**row, created_at=NOW)  # type: ignore[arg-type]


def test_usage_cuts_an_overlong_client_request_id_to_fit_its_column(store: Store) -> None:
    store.record_usage(usage("r" * 1000))
    [back] = store.usage_rows()
    assert back.request_id == "r" * 128


def test_usage_rows_come_back_in_time_order_and_filter_by_since(store: Store) -> None:
    for i, at in enumerate([NOW + 20, NOW, NOW + 10]):
        store.record_usage(usage(f"r{i}", at=at))
    assert [r.request_id for r in store.usage_rows()] == ["r1", "r2", "r0"]
    assert [r.request_id for r in store.usage_rows(since=NOW + 10)] == ["r2", "r0"]


def test_usage_totals_sum_per_key_node_and_model(store: Store) -> None:
    store.record_usage(usage("r1", key="k1", model="a"))
    store.record_usage(usage("r2", key="k1", model="b", outcome="node_lost_mid_stream"))
    store.record_usage(usage("r3", key="k2", node=None, model="a"))
    by_key = {t.group: t for t in store.usage_totals("key")}
    assert (by_key["k1"].requests, by_key["k1"].ok, by_key["k1"].prompt_tokens) == (2, 1, 20)
    assert by_key["k2"].completion_tokens == 5
    assert {t.group: t.requests for t in store.usage_totals("node")} == {DID_A: 2, "-": 1}
    assert {t.group: t.requests for t in store.usage_totals("model")} == {"a": 2, "b": 1}
    assert store.usage_totals("model", since=NOW + 1) == []


def test_usage_by_node_names_the_cloud_upstream_when_no_node_served(store: Store) -> None:
    store.record_usage(replace(usage("r1", node=None), upstream="openai", cost=0.25))
    [total] = store.usage_totals("node")
    assert (total.group, total.cost) == ("openai", 0.25)


def test_usage_totals_add_the_rows_still_only_in_a_ledger_journal_once(
        store: Store, tmp_path: Path) -> None:
    """Another process's totals (the local admin CLI): the store's rows plus the journal's
    rows past its mark, grouped as the query groups them; j1 is both committed and still
    in the journal and counts once."""
    journal = LedgerJournal(tmp_path / "j")
    store.record_usage(usage("s1"))
    rows = [asdict(r) for r in (
        replace(usage("j1", at=NOW + 1), latency_ms=400.0, joules=2.0, cost=0.5),
        replace(usage("j2", key="k2", node=None, model="b"), upstream="openai", cost=0.25),
        usage("j3", at=NOW - 10))]
    for row in rows:
        journal.append(row)
    store.record_rows(rows[:1], {journal.id: 1})  # committed, the journal not released

    def totals(by: UsageGroup, since: float | None = None) -> dict[str, UsageTotal]:
        return {t.group: t for t in store.usage_totals(by, since, [tmp_path / "j"])}

    k1 = totals("key")["k1"]
    assert (k1.requests, k1.ok, k1.prompt_tokens, k1.cost) == (3, 3, 30, 0.5)
    assert k1.avg_latency_ms == pytest.approx(200.0)
    assert (k1.joules, k1.joules_tokens) == (2.0, 15)
    assert totals("key")["k2"].cost == 0.25
    assert {g: t.requests for g, t in totals("node").items()} == {DID_A: 3, "openai": 1}
    assert {g: t.requests for g, t in totals("model").items()} == {"b": 1, "m": 3}
    assert {g: t.requests for g, t in totals("key", since=NOW).items()} == {"k1": 2, "k2": 1}
    assert [t.requests for t in store.usage_totals("key")] == [2]  # the store alone
    journal.close()


# ----------------------------------------------------------------------------- durability


def test_everything_survives_reopening_the_store(open_store: Opener) -> None:
    first = open_store()
    enroll(first, labels={"site": "x"})
    _, plaintext = first.create_key("app", NOW)
    first.record_usage(usage("r1"))
    first.close()
    again = open_store()
    assert [n.labels for n in again.list_nodes()] == [{"site": "x"}]
    assert again.verify_key(plaintext) is not None
    assert len(again.usage_rows()) == 1


def test_a_sqlite_store_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    store = Store(sqlite_url(tmp_path))
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA busy_timeout")).scalar_one() >= 1000
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
    finally:
        store.close()


def test_usage_rows_have_their_own_ids(store: Store) -> None:
    store.record_usage(usage("same"))
    store.record_usage(usage("same"))
    with store.engine.connect() as conn:
        ids = conn.execute(select(UsageRow.id)).scalars().all()
    assert len(set(ids)) == 2



def test_usage_keeps_the_route_it_ran_under(store: Store) -> None:
    store.record_usage(replace(usage("r1"), route="qg://prefer=local"))
    assert store.usage_rows()[0].route == "qg://prefer=local"


def test_a_sqlite_ledger_from_before_the_route_column_gets_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE usage_ledger (id INTEGER PRIMARY KEY, request_id VARCHAR(128),"
                     " key_id VARCHAR(64), node_did VARCHAR(255), upstream VARCHAR(200),"
                     " model VARCHAR(255), endpoint VARCHAR(64), prompt_tokens BIGINT,"
                     " completion_tokens BIGINT, latency_ms FLOAT, outcome VARCHAR(64),"
                     " cost FLOAT, created_at FLOAT)")
        conn.execute("INSERT INTO usage_ledger VALUES (1, 'old', 'k', NULL, 'up', 'm', 'e',"
                     " 1, 2, 3.0, 'ok', 0.5, 1.0)")
    store = Store(f"sqlite:///{path}")
    try:
        [old] = store.usage_rows()
        assert (old.request_id, old.route) == ("old", None)
        store.record_usage(replace(usage("new"), route="cache"))
        assert [r.route for r in store.usage_rows()] == [None, "cache"]
    finally:
        store.close()


def test_ingested_rows_count_once_by_their_ingest_key(store: Store) -> None:
    """A node's journal sent again (or twice at once by two replicas) lands once."""
    def row(i: int, key: str | None) -> UsageRecord:
        return UsageRecord(
            request_id=f"off_{i}", key_id=None, node_did="did:key:z6MkA", model="m",
            endpoint="chat/completions", prompt_tokens=1, completion_tokens=1, latency_ms=1.0,
            outcome="ok", created_at=1.0 + i, route="offline", joules=2.5,
            energy_estimated=False, ingest_key=key)

    batch = [row(i, f"k{i}") for i in range(3)]
    assert len(store.ingest_usage(batch)) == 3
    assert [r.request_id for r in store.ingest_usage([*batch, row(3, "k3")])] == ["off_3"]
    store.record_usage(row(9, None))  # rows the coordinator writes have no key
    store.record_usage(row(9, None))
    rows = store.usage_rows()
    assert len(rows) == 6
    assert sum(r.joules or 0 for r in rows) == 15.0
    with pytest.raises(CoordinatorError):
        store.ingest_usage([row(5, None)])
