"""The ledger journal: a request's row on local disk before its answer is written.

Issue 9 promised that a crash loses no ledger row: a row is stored before the answer's
last byte leaves, "or journaled locally and replayed on start". Committing to SQLite on
the answer's path cost ~70-150 us a request; appending one record to a local file costs
one ``os.write``. So the answer waits only for the journal, and the ledger writer's
thread commits journaled rows to the store in batches after the answers left.

Files: ``ledger-journal/<id>-<n>.lj`` in the coordinator's state directory, ``<id>`` new
for each run (a replica on PostgreSQL has a state directory, so a journal, of its own).
A record is ``<u32 length><u32 crc32>`` then msgpack ``[seq, row]``; ``seq`` counts the
run's rows from 1. The whole record goes in one ``os.write`` on an ``O_APPEND`` fd.

Durability: once ``append`` returns, the record is in the OS's page cache, so a killed
coordinator (SIGKILL, OOM, a crash) loses no row; the kernel writes the file. A power
cut or kernel crash can lose what was not yet flushed to disk: the same promise as the
store's own WAL with ``synchronous=NORMAL`` (ledger_writer.py), which fsyncs only at
checkpoints. A torn last record (the process died inside the write, or the disk filled)
fails its length or checksum and is skipped with a warning when the files are read.

Truncation: the writer thread commits a batch together with the journal's mark, the
last ``seq`` it stored (a ``generations`` row named ``ledger-journal:<id>``, in the
batch's own transaction), then calls `release`: segments whose rows are all committed
are deleted, and the current one is truncated once every row in it is committed. A
segment is closed past ``segment_bytes``, so the files stay bounded under a steady load
(what is journaled and not yet committed, plus one segment).

Replay (`recover`, on start, before the API listens): every file of an earlier run is
read; rows with a ``seq`` above that run's mark are stored, with the mark, in one
transaction; then the files go, then the mark. A crash between a commit and its
truncation replays nothing twice: the mark says how far the store already has it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

log = logging.getLogger(__name__)

JOURNAL_DIR = "ledger-journal"
SEGMENT_BYTES = 1 << 20
"""A segment is closed past this size (~3,000 rows): the bound on a caught-up journal."""
MARK_PREFIX = "ledger-journal:"
"""The ``generations`` row holding a journal's last committed ``seq`` is this + its id."""

Row = dict[str, Any]
Marks = dict[str, int]
"""journal id -> the last ``seq`` of it stored (in the same transaction as its rows)."""

_HEAD = struct.Struct("<II")
_NAME = re.compile(r"^([0-9a-f]{16})-(\d{6})\.lj$")
_encode = msgspec.msgpack.Encoder().encode


def mark_name(journal_id: str) -> str:
    return MARK_PREFIX + journal_id


class LedgerJournal:
    """One run's journal. `append` on the event loop; `release` on the writer thread."""

    def __init__(self, directory: Path, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        self.id = secrets.token_hex(8)
        self.segment_bytes = segment_bytes
        self.seq = 0
        """the last row appended"""
        self.committed = 0
        """the last row the store holds (`release`)"""
        self.segments_closed = 0
        self._lock = threading.Lock()  # append vs release: never a truncate under a write
        self._closed: list[tuple[Path, int]] = []  # closed segments, with their last seq
        self._number = 0
        self._fd = -1
        self._size = 0
        self._open_segment()  # raises OSError: the caller runs without a journal

    @property
    def path(self) -> Path:
        return self.directory / f"{self.id}-{self._number:06d}.lj"

    def files(self) -> list[Path]:
        return sorted(self.directory.glob(f"{self.id}-*.lj"))

    def append(self, row: Row) -> int:
        """Journal `row` with one write; its ``seq``. Raises OSError when the write fails
        or is short (a full disk): the partial record is cut off and nothing is journaled;
        the journal stays usable if the cut worked."""
        with self._lock:
            seq = self.seq + 1
            payload = _encode((seq, row))
            record = _HEAD.pack(len(payload), zlib.crc32(payload)) + payload
            if self._size >= self.segment_bytes:
                self._rotate()
            try:
                written = os.write(self._fd, record)
            except OSError:
                self._cut()
                raise
            if written != len(record):
                self._cut()
                raise OSError(errno.ENOSPC, f"short write to the ledger journal {self.path}")
            self._size += written
            self.seq = seq
            return seq

    def release(self, committed: int) -> None:
        """Rows up to `committed` are in the store: drop the files that hold only those."""
        with self._lock:
            self.committed = max(self.committed, committed)
            while self._closed and self._closed[0][1] <= self.committed:
                path, _ = self._closed.pop(0)
                path.unlink(missing_ok=True)
            if self.committed >= self.seq and self._size > 0 and self._fd >= 0:
                os.ftruncate(self._fd, 0)  # O_APPEND: the next record starts at 0
                self._size = 0

    def close(self) -> None:
        """Close the fd; the files go when every row is committed (a clean stop)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self.committed >= self.seq:
                for path in [*(p for p, _ in self._closed), self.path]:
                    path.unlink(missing_ok=True)
                self._closed.clear()

    def _open_segment(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o600)
        self._size = 0

    def _rotate(self) -> None:
        os.close(self._fd)
        self._closed.append((self.path, self.seq))
        self._number += 1
        self.segments_closed += 1
        self._open_segment()

    def _cut(self) -> None:
        """After a failed write: cut a partial record off, so the next one is readable."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            log.exception("LEDGER: the journal %s could not be cut back after a failed "
                          "write; its tail is skipped when it is replayed", self.path)


def read_segment(path: Path, *, live: bool = False) -> list[tuple[int, Row]]:
    """The records of one segment, in order, up to a torn or corrupt one (skipped, logged;
    `live`: the file of a running coordinator, whose last record may be half-written)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # live: committed and deleted meanwhile
        return []
    out: list[tuple[int, Row]] = []
    at = 0
    while at < len(data):
        if len(data) - at < _HEAD.size:
            break
        length, crc = _HEAD.unpack_from(data, at)
        payload = data[at + _HEAD.size:at + _HEAD.size + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            break
        try:
            seq, row = msgspec.msgpack.decode(payload)
        except (msgspec.DecodeError, TypeError, ValueError):
            break
        out.append((int(seq), dict(row)))
        at += _HEAD.size + length
    if at < len(data) and not live:
        log.warning("LEDGER: journal %s: a torn or corrupt record at byte %d was skipped "
                    "(%d byte(s): a write the process died in)", path, at, len(data) - at)
    return out


def journaled(directory: Path) -> list[tuple[str, int, Row]]:
    """(journal id, seq, row) of every record in `directory` now, a running
    coordinator's included (`LedgerStore.usage_rows_durable`)."""
    return [(jid, seq, row) for jid, paths in earlier_runs(directory).items()
            for path in paths for seq, row in read_segment(path, live=True)]


def earlier_runs(directory: Path) -> dict[str, list[Path]]:
    """journal id -> its segment files in order, for every run's files in `directory`."""
    runs: dict[str, list[tuple[int, Path]]] = {}
    for path in directory.glob("*.lj") if directory.is_dir() else ():
        match = _NAME.match(path.name)
        if match:
            runs.setdefault(match[1], []).append((int(match[2]), path))
    return {jid: [p for _, p in sorted(files)] for jid, files in runs.items()}


def recover(directory: Path, *, mark: Callable[[str], int],
            store: Callable[[list[Row], Marks], None],
            forget: Callable[[str], None]) -> int:
    """Store the rows earlier runs journaled and did not commit (blocking; on start,
    before a new journal opens); how many were stored. `mark(id)` is how far the store
    has journal ``id``; `store(rows, marks)` stores rows and marks in one transaction;
    `forget(id)` drops the mark once the files are gone. Raises what `store` raised (the
    files stay for the next start)."""
    stored = 0
    for jid, paths in earlier_runs(directory).items():
        done = mark(jid)
        records = [record for path in paths for record in read_segment(path)]
        rows = [row for seq, row in records if seq > done]
        if rows:
            store(rows, {jid: max(seq for seq, _ in records)})
            log.warning("LEDGER: %d journaled row(s) of an earlier run (journal %s) were "
                        "not in the store; stored now", len(rows), jid)
        stored += len(rows)
        for path in paths:  # the files first: a crash here leaves the mark, which skips
            path.unlink(missing_ok=True)
        forget(jid)
    return stored


def open_journal(directory: Path, *, segment_bytes: int = SEGMENT_BYTES
                 ) -> LedgerJournal | None:
    """A new journal, or None (logged) when it cannot be written: then every row is
    committed before its answer, as without a journal."""
    try:
        return LedgerJournal(directory, segment_bytes=segment_bytes)
    except OSError as exc:
        log.error("LEDGER: the ledger journal cannot be written in %s (%s); each row is "
                  "committed to the store before its answer instead", directory, exc)
        return None
