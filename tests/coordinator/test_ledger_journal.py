"""The ledger journal: rows on local disk before the answer, committed after it, replayed
on start exactly once, a torn tail skipped, its files bounded, a failed write falling back
to committing the row before the answer (real SQLite, real files)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from coordinator import ledger_journal
from coordinator.ledger_journal import (
    LedgerJournal,
    Marks,
    earlier_runs,
    open_journal,
    read_segment,
    recover,
)
from coordinator.ledger_writer import LedgerWriter
from coordinator.store import Store, UsageRecord


def _row(i: int) -> dict[str, Any]:
    return {"request_id": f"r{i}", "key_id": "k", "node_did": "n", "model": "m",
            "endpoint": "chat/completions", "prompt_tokens": i, "completion_tokens": 2,
            "latency_ms": 1.0, "outcome": "ok", "cost": 0.5}


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store(f"sqlite:///{tmp_path}/ledger.db")
    yield s
    s.close()


def _writer(store: Store, journal: LedgerJournal | None, **kw: Any) -> LedgerWriter:
    def write_many(rows: list[dict[str, Any]]) -> None:
        store.record_usages([UsageRecord(**{"created_at": 1.0, **r}) for r in rows])
    return LedgerWriter(write_many, journal=journal, write_journaled=store.record_rows, **kw)


def _recover(directory: Path, store: Store) -> int:
    return recover(directory, mark=store.journal_mark, store=store.record_rows,
                   forget=store.forget_journal_mark)


def _ids(store: Store) -> list[str]:
    return sorted(r.request_id for r in store.usage_rows())


def test_a_row_is_in_the_journal_when_append_returns_and_read_back_whole(
        tmp_path: Path) -> None:
    journal = LedgerJournal(tmp_path / "j")
    rows = [_row(i) | {"created_at": 10.0 + i, "model": "é" * 300} for i in range(3)]
    assert [journal.append(r) for r in rows] == [1, 2, 3]
    [path] = journal.files()
    assert path.stat().st_mode & 0o077 == 0
    assert read_segment(path) == list(zip([1, 2, 3], rows, strict=True))
    journal.close()  # nothing committed: the file stays for the next start
    assert path.exists()


def test_a_torn_last_record_is_skipped_and_the_rest_replayed(
        tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    journal = LedgerJournal(tmp_path / "j")
    for i in range(4):
        journal.append(_row(i) | {"created_at": 1.0})
    journal.close()
    [path] = journal.files()
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # the process died inside the last write
    with caplog.at_level(logging.WARNING, logger="coordinator.ledger_journal"):
        assert _recover(tmp_path / "j", store) == 3
    assert "torn or corrupt record" in caplog.text
    assert _ids(store) == ["r0", "r1", "r2"]
    assert not list((tmp_path / "j").iterdir())
    assert store.journal_mark(journal.id) == 0  # the mark goes with the files


def test_a_flipped_byte_stops_the_segment_there(tmp_path: Path) -> None:
    journal = LedgerJournal(tmp_path / "j")
    for i in range(3):
        journal.append(_row(i))
    [path] = journal.files()
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # the checksum catches it
    path.write_bytes(bytes(data))
    assert [seq for seq, _ in read_segment(path)] == [1, 2]
    journal.close()


async def test_journaled_rows_are_committed_with_the_mark_and_the_journal_emptied(
        tmp_path: Path, store: Store) -> None:
    journal = LedgerJournal(tmp_path / "j")
    writer = _writer(store, journal, linger_s=0.0)
    try:
        for i in range(20):
            assert writer.append(_row(i) | {})
        assert await asyncio.to_thread(writer.flush)
        assert _ids(store) == sorted(f"r{i}" for i in range(20))
        assert store.journal_mark(journal.id) == 20
        [path] = journal.files()
        assert path.stat().st_size == 0  # all committed: truncated
        assert all(r.created_at > 1.0 for r in store.usage_rows())  # stamped at append
    finally:
        writer.close()
    assert journal.files() == []  # a clean stop leaves nothing


def test_a_crash_between_commit_and_truncation_replays_nothing_twice(
        tmp_path: Path, store: Store) -> None:
    """The writer committed rows 1-5 with the mark, then the process died before the
    journal was truncated: the restart stores 6-8 only."""
    directory = tmp_path / "j"
    journal = LedgerJournal(directory)
    rows = [_row(i) | {"created_at": 1.0} for i in range(8)]
    for row in rows:
        journal.append(row)
    store.record_rows(rows[:5], {journal.id: 5})  # the batch and its mark, one transaction
    kept = tmp_path / "kept"
    shutil.copytree(directory, kept)  # what the disk holds at the crash
    assert _recover(kept, store) == 3
    assert _ids(store) == sorted(f"r{i}" for i in range(8))
    shutil.copytree(directory, kept, dirs_exist_ok=True)  # a second crash, before `forget`
    store.record_rows([], {journal.id: 8})
    assert _recover(kept, store) == 0
    assert len(store.usage_rows()) == 8  # each row once


def test_a_replay_that_fails_keeps_the_files(tmp_path: Path, store: Store) -> None:
    journal = LedgerJournal(tmp_path / "j")
    journal.append(_row(1) | {"created_at": 1.0})

    def refuse(rows: list[dict[str, Any]], marks: Marks) -> None:
        raise OSError("the disk is gone")

    with pytest.raises(OSError, match="gone"):
        recover(tmp_path / "j", mark=store.journal_mark, store=refuse,
                forget=store.forget_journal_mark)
    assert list(earlier_runs(tmp_path / "j")) == [journal.id]
    assert _recover(tmp_path / "j", store) == 1


async def test_the_journal_stays_bounded_under_a_steady_load(
        tmp_path: Path, store: Store) -> None:
    """5,000 rows through 4 KiB segments: closed segments go once committed, so the files
    never hold much more than what waits for a commit; nothing is left at the end."""
    journal = LedgerJournal(tmp_path / "j", segment_bytes=4096)
    writer = _writer(store, journal, linger_s=0.0)
    biggest = 0
    try:
        for i in range(5000):
            writer.append(_row(i))
            if i % 50 == 49:
                await asyncio.to_thread(writer.flush)
                biggest = max(biggest, sum(p.stat().st_size for p in journal.files()))
        assert await asyncio.to_thread(writer.flush)
        assert journal.segments_closed > 100
        assert biggest <= 4096 + 60 * 200  # a segment + the rows of one flush interval
        assert len(store.usage_rows()) == 5000
    finally:
        writer.close()
    assert journal.files() == []


async def test_flush_waits_for_rows_the_writer_would_hold(
        tmp_path: Path, store: Store) -> None:
    """Read-your-writes: the store's reads wait for the journaled rows (the writer lingers
    60 s here; the read does not)."""
    journal = LedgerJournal(tmp_path / "j")
    writer = _writer(store, journal, linger_s=60.0)
    store.ledger_barrier = writer.flush
    try:
        writer.append(_row(1))
        writer.append(_row(2))
        totals = await asyncio.wait_for(asyncio.to_thread(store.usage_totals, "key"), 10)
        assert [(t.requests, t.prompt_tokens) for t in totals] == [(2, 3)]
        assert await asyncio.to_thread(store.spend_by_key, 0.0, 0.0) == {"k": (1.0, 1.0)}
    finally:
        writer.close()


def test_an_unwritable_journal_directory_means_no_journal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "j").write_text("a file where the directory should be")
    with caplog.at_level(logging.ERROR):
        assert open_journal(tmp_path / "j") is None
    assert "committed to the store before its answer" in caplog.text


async def test_a_failed_journal_write_falls_back_to_committing_first(
        tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A full disk (os.write raising ENOSPC, a fake: the box has no small filesystem to
    fill): the row is not journaled, the writer says so once and from then on each row is
    stored before `write` returns; rows journaled before are still committed."""
    journal = LedgerJournal(tmp_path / "j")
    writer = _writer(store, journal, linger_s=0.0)
    try:
        assert writer.append(_row(1))
        real_write = os.write

        def full(fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ledger_journal.os, "write", full)
        with caplog.at_level(logging.ERROR):
            assert not writer.append(_row(2))
            await writer.write(_row(2))  # what ApiContext.commit does next
        monkeypatch.setattr(ledger_journal.os, "write", real_write)
        assert not writer.append(_row(3))  # the journal is left for this run
        await writer.write(_row(3))
        assert "could not be written" in caplog.text
        assert await asyncio.to_thread(writer.flush)
        assert _ids(store) == ["r1", "r2", "r3"]
        [path] = journal.files()
        assert read_segment(path) == []  # r1 committed: truncated; no partial record
    finally:
        writer.close()


def test_a_short_write_is_cut_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = LedgerJournal(tmp_path / "j")
    journal.append(_row(1))
    real_write = os.write
    monkeypatch.setattr(ledger_journal.os, "write",
                        lambda fd, data: real_write(fd, data[:5]))  # the disk filled mid-way
    with pytest.raises(OSError, match="short write"):
        journal.append(_row(2))
    monkeypatch.setattr(ledger_journal.os, "write", real_write)
    assert journal.append(_row(3)) == 2
    [path] = journal.files()
    assert [(seq, row["request_id"]) for seq, row in read_segment(path)] == [(1, "r1"),
                                                                               (2, "r3")]
    journal.close()


async def test_a_row_the_journal_cannot_encode_is_committed_first_and_alone(
        tmp_path: Path, store: Store) -> None:
    journal = LedgerJournal(tmp_path / "j")
    stored: list[dict[str, Any]] = []
    writer = LedgerWriter(stored.extend, journal=journal, write_journaled=store.record_rows,
                          linger_s=0.0)
    try:
        odd = _row(1) | {"joules": object()}  # not a type a ledger row carries
        assert not writer.append(odd)
        assert "created_at" not in odd
        await writer.write(odd)
        assert stored == [odd]
        assert writer.append(_row(2))  # the journal goes on for the next row
    finally:
        writer.close()
    assert _ids(store) == ["r2"]


def test_another_process_reads_committed_and_journaled_rows_once(
        tmp_path: Path, store: Store) -> None:
    """`usage_rows_durable`: the store's rows plus the journal's rows past its mark, each
    once, whether the writer has committed them, truncated the journal, or neither."""
    journal = LedgerJournal(tmp_path / "j")
    rows = [_row(i) | {"created_at": 1.0} for i in range(5)]
    for row in rows:
        journal.append(row)

    def durable() -> list[str]:
        return sorted(r.request_id for r in store.usage_rows_durable(tmp_path / "j"))

    everything = [f"r{i}" for i in range(5)]
    assert durable() == everything  # all journaled, none committed
    store.record_rows(rows[:3], {journal.id: 3})
    assert durable() == everything  # committed, the journal not truncated yet
    journal.release(3)
    store.record_rows(rows[3:], {journal.id: 5})
    journal.release(5)
    assert journal.files()[0].stat().st_size == 0
    assert durable() == everything
    journal.close()
