"""The node's usage journal: what it served while the coordinator could not hear about it.

Two files in the state directory:

- ``usage-journal.jsonl``: one JSON object per line, appended and fsync'd
  before :meth:`UsageJournal.append` returns (a crash loses at most the row
  being written; a torn last line is cut off when the journal is opened);
- ``usage-journal.acked``: the byte offset up to which the coordinator has
  confirmed the rows (written to a temporary file, fsync'd, renamed).

Bounded: past ``max_bytes`` of unconfirmed rows a new row is dropped and
counted (``dropped``), with a warning, rather than filling the disk.

Rows are sent (:meth:`pending`) and confirmed (:meth:`ack`) in order. When
every row is confirmed both files go (the offset file first: a crash between
the two leaves the rows to be sent again, which the coordinator ignores, as
it keys them by request id; the other order could skip rows written later).
Not thread-safe: one event loop appends and uploads; uploaders take ``uploading``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL = "usage-journal.jsonl"
ACKED = "usage-journal.acked"
DEFAULT_MAX_BYTES = 64 * 2**20  # ~200,000 rows


class UsageJournal:
    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = directory / JOURNAL
        self.acked_path = directory / ACKED
        self.max_bytes = max_bytes
        self.dropped = 0
        self.appended = 0
        self._rows = asyncio.Event()
        #: held from `pending` to `ack` by an uploader: one upload at a time (a node has a
        #: link per coordinator replica), so no confirmation can cover rows it did not send
        self.uploading = asyncio.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        self._size = self._repair()
        self._acked = min(self._read_acked(), self._size)
        if self._acked < self._size:
            self._rows.set()

    # -- state

    @property
    def size(self) -> int:
        return self._size

    @property
    def unacked_bytes(self) -> int:
        return self._size - self._acked

    def has_pending(self) -> bool:
        return self._size > self._acked

    async def wait_pending(self) -> None:
        """Until there is at least one row to send."""
        while not self.has_pending():
            self._rows.clear()
            await self._rows.wait()

    # -- writing

    def append(self, row: dict[str, Any]) -> bool:
        """Write one row durably; False (and counted) when the journal is full."""
        line = (json.dumps(row, separators=(",", ":"), default=str) + "\n").encode()
        if self.unacked_bytes + len(line) > self.max_bytes:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("usage journal full (%d bytes not yet uploaded): %d row(s) dropped",
                            self.unacked_bytes, self.dropped)
            return False
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._size += len(line)
        self.appended += 1
        self._rows.set()
        return True

    # -- sending

    def pending(self, limit: int = 500) -> tuple[list[dict[str, Any]], int]:
        """Up to `limit` rows not yet confirmed, and the offset to :meth:`ack` once they are."""
        rows: list[dict[str, Any]] = []
        if not self.has_pending():
            return rows, self._acked
        offset = self._acked
        with self.path.open("rb") as f:
            f.seek(offset)
            for line in f:
                if len(rows) >= limit or offset + len(line) > self._size:
                    break
                offset += len(line)
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if isinstance(row, dict):
                    rows.append(row)
                else:
                    log.warning("usage journal: skipping a line that is not a JSON object")
        return rows, offset

    def ack(self, offset: int) -> None:
        """The rows before `offset` are in the coordinator's ledger."""
        if offset <= self._acked:
            return
        self._acked = min(offset, self._size)
        if self._acked >= self._size:
            self._compact()
        else:
            _write_durably(self.acked_path, str(self._acked).encode())

    # -- files

    def _compact(self) -> None:
        self.acked_path.unlink(missing_ok=True)  # first: see the module doc
        self.path.unlink(missing_ok=True)
        _fsync_dir(self.path.parent)
        self._size = self._acked = 0

    def _repair(self) -> int:
        """The journal's size, after cutting off a torn last line (a crash mid-append)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            log.warning("usage journal: cutting off a torn last row (%d bytes)", len(data) - keep)
            with self.path.open("r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
        return keep

    def _read_acked(self) -> int:
        try:
            return max(0, int(self.acked_path.read_text().strip() or 0))
        except (FileNotFoundError, ValueError):
            return 0


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
