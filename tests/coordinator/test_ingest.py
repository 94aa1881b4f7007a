"""Energy in the ledger and the offline journal's idempotent ingest (SQLite store)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.ingest import OFFLINE_ROUTE, ingest_key, journal_record
from coordinator.state import StateDir
from coordinator.store import Store, UsageRecord
from meshgate.protocol import EnergyReport, ProtocolViolation, journal_rows

DID = "did:key:z6MkNodeA"
NOW = 1_790_000_000.0


def good_row(i: int = 0, **over: object) -> dict[str, object]:
    row: dict[str, object] = {
        "request_id": f"off_{i}", "model": "smollm2", "endpoint": "chat/completions",
        "prompt_tokens": 10, "completion_tokens": 4, "latency_ms": 120.5, "outcome": "ok",
        "created_at": NOW - 60, "joules": 35.5, "energy_estimated": False,
        "energy_cost": 0.0000035,
    }
    row.update(over)
    return row


def test_a_journal_row_becomes_an_offline_ledger_row_of_the_uploading_node() -> None:
    record = journal_record(DID, good_row(node_did="did:key:someone-else"), NOW)
    assert record.node_did == DID
    assert record.route == OFFLINE_ROUTE
    assert record.key_id is None
    assert (record.prompt_tokens, record.completion_tokens) == (10, 4)
    assert record.joules == 35.5
    assert record.energy_estimated is False
    assert record.created_at == NOW - 60
    assert record.ingest_key == ingest_key(DID, "off_0")
    assert ingest_key("did:key:other", "off_0") != record.ingest_key


@pytest.mark.parametrize(("over", "field"), [
    ({"request_id": ""}, "request_id"),
    ({"request_id": 7}, "request_id"),
    ({"model": None}, "model"),
    ({"endpoint": "admin/keys"}, "endpoint"),
    ({"prompt_tokens": -1}, "prompt_tokens"),
    ({"completion_tokens": 1.5}, "completion_tokens"),
    ({"latency_ms": float("nan")}, "latency_ms"),
])
def test_a_bad_row_is_refused_naming_its_field(over: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        journal_record(DID, good_row(**over), NOW)


def test_insane_energy_and_times_are_not_believed() -> None:
    record = journal_record(
        DID, good_row(joules=float("inf"), energy_cost=-1, created_at=NOW + 86400), NOW)
    assert record.joules is None
    assert record.energy_cost is None
    assert record.created_at == NOW  # a clock in the future: stamped on arrival
    assert EnergyReport.from_wire({"joules": True}).joules is None
    assert EnergyReport.from_wire({"joules": 2e9}).joules is None
    assert EnergyReport.from_wire({"joules": 12, "energy_estimated": True}) == EnergyReport(
        12.0, True, None)


def test_journal_rows_tells_an_upload_from_a_request() -> None:
    assert journal_rows({"request_id": "x", "endpoint": "chat/completions"}) is None
    assert journal_rows({"usage_journal": [good_row()]}) == [good_row()]
    with pytest.raises(ProtocolViolation):
        journal_rows({"usage_journal": "rows"})
    with pytest.raises(ProtocolViolation):
        journal_rows({"usage_journal": [1, 2]})
    with pytest.raises(ProtocolViolation):
        journal_rows({"usage_journal": [good_row()] * 1001})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'ledger.db'}")


def test_ingest_counts_each_row_once_however_often_it_is_sent(store: Store) -> None:
    batch = [journal_record(DID, good_row(i), NOW) for i in range(3)]
    assert len(store.ingest_usage(batch)) == 3
    again = [journal_record(DID, good_row(i), NOW) for i in range(5)]  # 3 old, 2 new
    assert [r.request_id for r in store.ingest_usage(again)] == ["off_3", "off_4"]
    assert store.ingest_usage(again) == []
    rows = store.usage_rows()
    assert sorted(r.request_id for r in rows) == [f"off_{i}" for i in range(5)]
    assert {r.route for r in rows} == {OFFLINE_ROUTE}
    other = journal_record("did:key:z6MkNodeB", good_row(0), NOW)  # same id, other node
    assert len(store.ingest_usage([other])) == 1
    store.close()


def test_rows_the_coordinator_writes_have_no_ingest_key_and_never_collide(store: Store) -> None:
    for i in range(2):
        store.record_usage(UsageRecord(
            request_id="same", key_id="k", node_did=DID, model="smollm2",
            endpoint="chat/completions", prompt_tokens=1, completion_tokens=1, latency_ms=1.0,
            outcome="ok", created_at=NOW + i, joules=None))
    assert [r.ingest_key for r in store.usage_rows()] == [None, None]
    store.close()


def test_totals_sum_joules_only_where_measured_and_give_j_per_1k_tokens(store: Store) -> None:
    def rec(i: int, joules: float | None, tokens: int) -> UsageRecord:
        return UsageRecord(
            request_id=f"r{i}", key_id=None, node_did=DID, model="smollm2",
            endpoint="chat/completions", prompt_tokens=tokens, completion_tokens=0,
            latency_ms=1.0, outcome="ok", created_at=NOW, joules=joules,
            energy_cost=None if joules is None else joules * 1e-7)

    for r in (rec(0, 100.0, 500), rec(1, 50.0, 500), rec(2, None, 9000)):
        store.record_usage(r)
    store.record_usage(UsageRecord(
        request_id="c", key_id=None, node_did=None, upstream="openai", model="gpt",
        endpoint="chat/completions", prompt_tokens=10, completion_tokens=0, latency_ms=1.0,
        outcome="ok", created_at=NOW))
    by_model = {t.group: t for t in store.usage_totals("model")}
    smol = by_model["smollm2"]
    assert smol.joules == pytest.approx(150.0)
    assert smol.joules_tokens == 1000  # the unmeasured row's tokens do not dilute it
    assert smol.joules_per_1k_tokens == pytest.approx(150.0)
    assert smol.energy_cost == pytest.approx(150e-7)
    assert by_model["gpt"].joules is None
    assert by_model["gpt"].joules_per_1k_tokens is None
    store.close()


def test_an_existing_ledger_gains_the_energy_columns_and_the_unique_key(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the ledger as it was before energy existed
        db.execute("CREATE TABLE usage_ledger (id INTEGER PRIMARY KEY, request_id VARCHAR(128),"
                   " key_id VARCHAR(64), node_did VARCHAR(255), upstream VARCHAR(200),"
                   " model VARCHAR(255), endpoint VARCHAR(64), prompt_tokens BIGINT,"
                   " completion_tokens BIGINT, latency_ms FLOAT, outcome VARCHAR(64),"
                   " cost FLOAT, created_at FLOAT)")
        db.execute("INSERT INTO usage_ledger VALUES (1, 'old', NULL, NULL, 'openai', 'm',"
                   " 'chat/completions', 1, 1, 1.0, 'ok', 0.1, 1.0)")
    store = Store(f"sqlite:///{path}")
    [old] = store.usage_rows()
    assert old.joules is None
    record = journal_record(DID, good_row(), NOW)
    assert len(store.ingest_usage([record, record])) == 1
    store.close()
    Store(f"sqlite:///{path}").close()  # a second start finds everything in place


def test_usage_cli_shows_joules_and_j_per_1k_tokens(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "coord")
    store = Store(state.db_url)
    now = time.time()
    store.ingest_usage([journal_record(DID, good_row(i, created_at=now - 5, joules=20.0,
                                                     prompt_tokens=90, completion_tokens=10),
                                       now) for i in range(2)])
    store.close()
    runner = CliRunner()
    done = runner.invoke(app, ["usage", "--state-dir", str(state.path), "--by", "node"])
    assert done.exit_code == 0, done.output
    header, row, total = done.stdout.strip().splitlines()[-3:]
    assert header.split()[-3:] == ["J", "J/1K", "TOK"]
    assert row.split()[-2:] == ["40.0", "200.0"]  # 40 J over 200 tokens
    assert total.split()[-2:] == ["40.0", "200.0"]
    data = json.loads(runner.invoke(
        app, ["usage", "--state-dir", str(state.path), "--json"]).stdout)
    assert data["total"]["joules"] == pytest.approx(40.0)
    assert data["groups"][0]["joules_per_1k_tokens"] == pytest.approx(200.0)
