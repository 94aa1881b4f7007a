"""`meshgate-coordinator nodes`, `node revoke` and `usage`, on a real state directory."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest

from coordinator.ledger_journal import JOURNAL_DIR, LedgerJournal
from coordinator.live import LIVE_FILE
from coordinator.store import Store, UsageRecord
from tests.coordinator.cli_admin_harness import (
    DID,
    make_state_dir,
    open_store,
    run,
    run_real,
)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return make_state_dir(tmp_path)


# ----------------------------------------------------------------------------- nodes


def _enroll(state_dir: Path, did: str, labels: dict[str, str]) -> Store:
    store = open_store(state_dir)
    token_id, secret = store.create_token(60, labels, time.time())
    store.redeem_token(token_id, secret, did, time.time())
    return store


def write_live_file(state_dir: Path, nodes: dict[str, dict[str, object]], age: float) -> None:
    """What a running server writes (coordinator.live), `age` seconds ago."""
    view = {"written_at": time.time() - age, "period_s": 2.0, "pid": 1, "nodes": nodes}
    (state_dir / LIVE_FILE).write_text(json.dumps(view))


LIVE = {
    "rtt_ms": 1.5, "in_flight": 2, "models": ["smollm2"], "loaded": ["smollm2"],
    "cpu_util_pct": 37.0, "load_1m": 1.25, "mem_total_bytes": 32 * 1024**3,
    "mem_available_bytes": 20 * 1024**3,
    "gpus": [{"name": "NVIDIA GeForce RTX 4090", "vram_used_bytes": 18 * 1024**3,
              "vram_total_bytes": 24 * 1024**3, "gpu_util_pct": 97.0}],
}


def test_nodes_json_marks_nodes_in_the_live_view_connected(state_dir: Path) -> None:
    store = _enroll(state_dir, DID, {"site": "a"})
    quiet = "did:key:z6MkQUIET"
    try:
        store.touch_node(DID, time.time(), ["smollm2"])
        token_id, secret = store.create_token(60, {}, time.time())
        store.redeem_token(token_id, secret, quiet, time.time())
        store.touch_node(quiet, time.time() - 1)  # seen a moment ago, but gone since
    finally:
        store.close()
    write_live_file(state_dir, {DID: LIVE}, age=0.5)
    done = run_real(state_dir, "nodes", "--json")
    assert done.returncode == 0, done.stderr
    nodes = {n["did"]: n for n in json.loads(done.stdout)}
    assert nodes[DID]["connected"] is True
    assert nodes[DID]["state"] == "connected"
    assert nodes[DID]["models"] == ["smollm2"]
    assert nodes[DID]["labels"] == {"site": "a"}
    assert nodes[quiet]["connected"] is False
    assert nodes[quiet]["state"] == "enrolled"
    assert nodes[DID]["live"]["rtt_ms"] == 1.5
    assert nodes[quiet]["live"] is None


def test_nodes_table_shows_live_gpu_memory_and_round_trip(state_dir: Path) -> None:
    _enroll(state_dir, DID, {}).close()
    write_live_file(state_dir, {DID: LIVE}, age=0.5)
    done = run(state_dir, "nodes")
    assert done.exit_code == 0, done.stderr
    [row] = [line for line in done.stdout.splitlines() if line.startswith(DID)]
    assert "connected" in row
    assert "1.5ms" in row
    assert "GeForce RTX 4090 18.0/24.0G 97%" in row
    assert "12.0/32.0G" in row  # memory used of total
    assert "smollm2*" in row  # loaded


def test_a_stale_live_view_means_nobody_is_connected(state_dir: Path) -> None:
    _enroll(state_dir, DID, {}).close()
    write_live_file(state_dir, {DID: LIVE}, age=60)  # the server died a minute ago
    [node] = json.loads(run(state_dir, "nodes", "--json").stdout)
    assert node["connected"] is False
    assert "no coordinator is serving" in run(state_dir, "nodes").stdout


def test_nodes_table_lists_each_node_with_its_state_and_labels(state_dir: Path) -> None:
    _enroll(state_dir, DID, {"site": "a"}).close()
    done = run(state_dir, "nodes")
    assert done.exit_code == 0, done.stderr
    assert DID in done.stdout
    assert "site=a" in done.stdout
    assert "never" in done.stdout


def test_node_revoke_marks_the_node_revoked(state_dir: Path) -> None:
    _enroll(state_dir, DID, {}).close()
    done = run(state_dir, "node", "revoke", DID)
    assert done.exit_code == 0, done.stderr
    [node] = json.loads(run(state_dir, "nodes", "--json").stdout)
    assert node["state"] == "revoked"
    assert node["connected"] is False
    assert "already revoked" in run(state_dir, "node", "revoke", DID).stdout


def test_revoking_an_unknown_node_is_a_usage_error(state_dir: Path) -> None:
    done = run(state_dir, "node", "revoke", DID)
    assert done.exit_code == 2
    assert f"unknown node {DID}" in done.stderr


# ----------------------------------------------------------------------------- usage


def _ledger(state_dir: Path) -> str:
    store = open_store(state_dir)
    try:
        record, _ = store.create_key("web-app", time.time())
        for i, (model, age) in enumerate([("a", 10), ("a", 20), ("b", 7200)]):
            store.record_usage(UsageRecord(
                request_id=f"r{i}", key_id=record.key_id, node_did=DID, model=model,
                endpoint="/v1/chat/completions", prompt_tokens=10, completion_tokens=2,
                latency_ms=50.0, outcome="ok", created_at=time.time() - age, cost=0.25,
            ))
    finally:
        store.close()
    return record.key_id


def test_usage_sums_the_ledger_per_model_since_a_duration_ago(state_dir: Path) -> None:
    _ledger(state_dir)
    everything = json.loads(run(state_dir, "usage", "--json").stdout)
    recent = json.loads(run(state_dir, "usage", "--since", "1h", "--json").stdout)
    assert {r["model"]: r["requests"] for r in everything["groups"]} == {"a": 2, "b": 1}
    assert everything["total"]["requests"] == 3
    assert everything["total"]["cost"] == pytest.approx(0.75)
    assert everything["since"] is None
    assert {r["model"]: r["prompt_tokens"] for r in recent["groups"]} == {"a": 20}
    assert recent["total"]["prompt_tokens"] == 20
    assert recent["since"].startswith("20")


def test_usage_by_key_names_the_key(state_dir: Path) -> None:
    key_id = _ledger(state_dir)
    [row] = json.loads(run(state_dir, "usage", "--by", "key", "--json").stdout)["groups"]
    assert row["key"] == key_id
    assert row["name"] == "web-app"
    assert "web-app" in run(state_dir, "usage", "--by", "key").stdout


def test_usage_as_csv_has_a_header_one_row_per_group_and_the_total(state_dir: Path) -> None:
    _ledger(state_dir)
    store = open_store(state_dir)
    try:
        store.record_usage(UsageRecord(
            request_id="c1", key_id=None, node_did=None, upstream="openai", model="a",
            endpoint="chat/completions", prompt_tokens=100, completion_tokens=50,
            latency_ms=300.0, outcome="ok", created_at=time.time(), cost=0.5,
            route="prefer=speed"))
    finally:
        store.close()
    done = run(state_dir, "usage", "--by", "node", "--since", "2026-11-01", "--csv")
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(r["node"], r["requests"]) for r in rows] == [
        (DID, "3"), ("openai", "1"), ("TOTAL", "4")]
    assert float(rows[-1]["cost"]) == pytest.approx(1.25)
    assert float(rows[-1]["avg_latency_ms"]) == pytest.approx((3 * 50 + 300) / 4)


def test_usage_table_ends_with_the_total(state_dir: Path) -> None:
    _ledger(state_dir)
    lines = run(state_dir, "usage", "--since", "24h").stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["MODEL", "REQUESTS"]
    assert lines[-1].split()[:3] == ["TOTAL", "3", "3"]


def test_usage_counts_the_rows_a_running_server_has_only_journaled_once(
        state_dir: Path) -> None:
    """The CLI is another process than the server: rows journaled and not yet committed
    (j2, j3) count, and a row committed whose journal is not yet truncated (j1) counts once."""
    key_id = _ledger(state_dir)
    journal = LedgerJournal(state_dir / JOURNAL_DIR)  # as a running server's
    rows = [{"request_id": f"j{i}", "key_id": key_id, "node_did": DID, "model": model,
             "endpoint": "/v1/chat/completions", "prompt_tokens": 10, "completion_tokens": 2,
             "latency_ms": 50.0, "outcome": "ok", "created_at": time.time(), "cost": 1.0}
            for i, model in [(1, "a"), (2, "a"), (3, "c")]]
    for row in rows:
        journal.append(row)
    store = open_store(state_dir)
    try:
        store.record_rows(rows[:1], {journal.id: 1})
    finally:
        store.close()
    done = run_real(state_dir, "usage", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {r["model"]: r["requests"] for r in report["groups"]} == {"a": 4, "b": 1, "c": 1}
    assert report["total"]["cost"] == pytest.approx(0.75 + 3.0)
    [by_key] = json.loads(run(state_dir, "usage", "--by", "key", "--since", "1h",
                              "--json").stdout)["groups"]
    assert (by_key["requests"], by_key["cost"]) == (5, pytest.approx(0.5 + 3.0))
    journal.close()


@pytest.mark.parametrize("args", [["--by", "user"], ["--since", "yesterday"]])
def test_bad_usage_options_are_usage_errors(state_dir: Path, args: list[str]) -> None:
    done = run(state_dir, "usage", *args)
    assert done.exit_code == 2
    assert "bad --" in done.stderr
