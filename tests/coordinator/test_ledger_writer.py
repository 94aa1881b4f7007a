"""The ledger writer: rows stored before `write` returns, many per transaction, a bad row alone."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from coordinator.ledger_writer import (
    HOUSEKEEPING_EVERY,
    LINGER_ENV,
    LINGER_S,
    LedgerWriter,
    linger_from_env,
)
from coordinator.store import Store, UsageRecord


def _row(i: int, **extra: Any) -> dict[str, Any]:
    return {"request_id": f"r{i}", "key_id": "k", "node_did": "n", "model": "m",
            "endpoint": "chat/completions", "prompt_tokens": 1, "completion_tokens": 2,
            "latency_ms": 1.0, "outcome": "ok", "cost": 0.0, **extra}


async def test_rows_queued_while_a_commit_runs_share_the_next_transaction(
        tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/ledger.db")
    batches: list[int] = []
    first_started = threading.Event()
    release = threading.Event()

    def write_many(rows: list[dict[str, Any]]) -> None:
        if not batches:  # hold the first commit until every other row is queued
            first_started.set()
            release.wait(10)
        batches.append(len(rows))
        store.record_usages([UsageRecord(**r, created_at=0.0) for r in rows])

    writer = LedgerWriter(write_many)
    try:
        first = asyncio.create_task(writer.write(_row(0)))
        await asyncio.to_thread(first_started.wait, 10)
        rest = [asyncio.create_task(writer.write(_row(i))) for i in range(1, 50)]
        await asyncio.sleep(0)  # every row of `rest` is queued now
        assert not any(t.done() for t in [first, *rest])  # nothing returns before its commit
        release.set()
        await asyncio.gather(first, *rest)
        assert batches == [1, 49]
        assert sorted(r.request_id for r in store.usage_rows()) == sorted(
            f"r{i}" for i in range(50))
    finally:
        writer.close()
        store.close()


async def test_a_row_the_store_refuses_fails_alone(tmp_path: Path) -> None:
    stored: list[str] = []
    entered, gate = threading.Event(), threading.Event()

    def write_many(rows: list[dict[str, Any]]) -> None:  # all or none, like the store
        entered.set()
        gate.wait(10)
        if any(r["request_id"] == "bad" for r in rows):
            raise ValueError("refused")
        stored.extend(r["request_id"] for r in rows)

    writer = LedgerWriter(write_many)
    try:
        tasks = [asyncio.create_task(writer.write(_row(0)))]
        await asyncio.to_thread(entered.wait, 10)  # the writer holds row 0 at the gate
        tasks += [asyncio.create_task(writer.write({"request_id": r})) for r in ("a", "bad", "b")]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [type(r).__name__ for r in results] == ["NoneType", "NoneType", "ValueError",
                                                      "NoneType"]
        assert sorted(stored) == ["a", "b", "r0"]
    finally:
        writer.close()


async def test_close_stores_what_is_queued_and_a_closed_writer_restarts() -> None:
    stored: list[str] = []
    writer = LedgerWriter(lambda rows: stored.extend(r["request_id"] for r in rows))
    await writer.write(_row(1))
    await asyncio.to_thread(writer.close)
    await writer.write(_row(2))  # a later row starts a fresh thread
    await asyncio.to_thread(writer.close)
    assert stored == ["r1", "r2"]


@pytest.mark.parametrize("batch", [1, 3])
async def test_max_batch_bounds_one_transaction(batch: int) -> None:
    sizes: list[int] = []
    entered, gate = threading.Event(), threading.Event()

    def write_many(rows: list[dict[str, Any]]) -> None:
        entered.set()
        gate.wait(10)
        sizes.append(len(rows))

    writer = LedgerWriter(write_many, max_batch=batch)
    try:
        tasks = [asyncio.create_task(writer.write(_row(i))) for i in range(7)]
        await asyncio.to_thread(entered.wait, 10)  # every row is queued before the first wait
        gate.set()
        await asyncio.gather(*tasks)
        assert max(sizes) <= batch
        assert sum(sizes) == 7
    finally:
        writer.close()


def test_the_sqlite_append_is_all_or_none_and_recovers(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/ledger.db")
    try:
        good = UsageRecord(**_row(1), created_at=1.0)
        bad = UsageRecord(**{**_row(2), "prompt_tokens": None}, created_at=1.0)  # NOT NULL
        with pytest.raises(Exception, match="NOT NULL"):
            store.record_usages([good, bad])
        assert store.usage_rows() == []  # the good row went back with the bad one
        store.record_usages([good])  # no transaction left open behind the failure
        assert [r.request_id for r in store.usage_rows()] == ["r1"]
    finally:
        store.close()


async def test_a_row_that_finds_the_writer_idle_is_stored_without_a_thread() -> None:
    now: list[str] = []
    queued: list[str] = []
    jobs: list[int] = []
    busy = False

    def write_now(rows: list[dict[str, Any]]) -> bool:
        if busy:
            return False
        now.extend(r["request_id"] for r in rows)
        return True

    writer = LedgerWriter(lambda rows: queued.extend(r["request_id"] for r in rows),
                          write_now=write_now, housekeeping=lambda: jobs.append(1))
    try:
        for i in range(HOUSEKEEPING_EVERY):
            await writer.write(_row(i))
        assert len(now) == HOUSEKEEPING_EVERY
        busy = True  # someone else holds the lock: the thread waits for it instead
        await writer.write(_row(-1))
        assert queued == ["r-1"]
        assert jobs == [1]  # one checkpoint after HOUSEKEEPING_EVERY rows stored at once
    finally:
        writer.close()


def test_the_loops_sqlite_write_never_waits_for_the_lock(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/ledger.db")
    other = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    try:
        record = UsageRecord(**_row(1), created_at=1.0)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
        assert store.record_usages_now([record]) is False
        other.execute("COMMIT")
        assert store.record_usages_now([record]) is True
        store.ledger_checkpoint()
        assert [r.request_id for r in store.usage_rows()] == ["r1"]
    finally:
        other.close()
        store.close()


def test_a_row_stored_from_its_dict_equals_the_record_path(tmp_path: Path) -> None:
    """`record_rows_now` (the request path: no UsageRecord) stores what `record_usages_now`
    stores for the same row, cuts to the columns' widths included; locked, nothing."""
    store = Store(f"sqlite:///{tmp_path}/ledger.db")
    other = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    long = _row(0, request_id="r" * 200, model="m" * 300, upstream="u" * 300,
                route="q" * 300, outcome="o" * 100, status=502, error="e" * 100,
                joules=1.5, energy_estimated=True, energy_cost=0.25, node_did=None)
    rows = [_row(1), _row(2, upstream="cloud-a", route="qg://prefer=local", status=200), long]
    try:
        assert store.record_usages_now([UsageRecord(**r, created_at=5.0) for r in rows])
        by_record = store.usage_rows()
        for row in rows:
            row["request_id"] = "b" + row["request_id"]
        other.execute("BEGIN IMMEDIATE")
        assert store.record_rows_now(rows, 5.0) is False
        other.execute("COMMIT")
        assert store.record_rows_now(rows, 5.0) is True
        by_dict = [r for r in store.usage_rows() if r.request_id.startswith("b")]
        assert len(by_record) == len(by_dict) == 3
        key = lambda r: r.request_id.lstrip("b")  # noqa: E731
        for a, b in zip(sorted(by_record, key=key), sorted(by_dict, key=key), strict=True):
            assert dataclasses.replace(b, request_id=a.request_id) == a
            assert b.request_id == ("b" + a.request_id)[:128]
        with pytest.raises(KeyError):  # a row without a required field is refused
            store.record_rows_now([{"request_id": "x"}], 5.0)
    finally:
        other.close()
        store.close()


def test_the_linger_knob_is_read_in_ms_and_a_bad_value_names_itself() -> None:
    assert linger_from_env({}) == LINGER_S
    assert linger_from_env({LINGER_ENV: " 0 "}) == 0.0
    assert linger_from_env({LINGER_ENV: "60000"}) == 60.0
    for bad in ("soon", "-1", "60001", "nan", "inf"):
        with pytest.raises(ValueError, match=f"^{LINGER_ENV}='{bad}': must be a number of ms"):
            linger_from_env({LINGER_ENV: bad})
