"""Ledger rows written by one thread, many rows per transaction (group commit).

A request's ledger row is stored before its answer's last byte leaves (issue 9:
a coordinator killed the moment an answer was read has its row). Writing each
row in its own ``asyncio.to_thread`` call cost a thread-pool hand-off and one
transaction per request; here one long-lived writer thread takes every row
queued while it was busy and stores them in one transaction, then wakes the
waiting requests with one loop callback per batch. A lone request pays one
hand-off each way; 500 concurrent streams share a handful of commits.

A batch the store refuses is retried row by row, so one bad row fails alone
(its waiter gets the exception) and the others are still stored.

With `write_now` (SQLite: a write that never waits for the lock), a row that finds
the thread idle is stored by the caller itself, on the event loop, at once: a lone
request makes no hand-off at all; when someone else holds the write lock or rows are
queued, it goes to the thread as above. Every HOUSEKEEPING_EVERY such rows the thread
runs `housekeeping` (the WAL checkpoint that the loop's connection leaves undone).

What "stored" means on SQLite (store/core.py: WAL, synchronous=NORMAL): a committed row
is in the write-ahead log, in the OS's page cache, when the answer's last byte leaves. A
coordinator process that is killed (SIGKILL, OOM, a crash) loses no row (the kernel
writes the file; test_ledger_durable kills it the moment answers were read); a power cut
or kernel crash can lose the rows since the last fsync (each checkpoint fsyncs). FULL
would fsync every commit (one disk flush per request on the request path); the ledger's
promise is against the process dying, which is what a gateway sees, so NORMAL holds it.
PostgreSQL commits are durable as the server is configured (synchronous_commit).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_BATCH = 512
"""Rows per transaction at most (bounds one commit's time under a burst)."""
HOUSEKEEPING_EVERY = 256
"""Rows stored by `write_now` between two housekeeping jobs on the thread (a WAL
checkpoint: the loop's own connection never checkpoints)."""

Row = dict[str, Any]
_Item = tuple[Row, asyncio.Future[None], asyncio.AbstractEventLoop]


class LedgerWriter:
    """Store rows with `write_many` (blocking, one transaction) on a thread of its own."""

    def __init__(self, write_many: Callable[[list[Row]], None], *,
                 max_batch: int = MAX_BATCH,
                 write_now: Callable[[list[Row]], bool] | None = None,
                 housekeeping: Callable[[], None] | None = None) -> None:
        self._write_many = write_many
        self._max_batch = max_batch
        self._write_now = write_now
        self._housekeeping = housekeeping
        self._queue: queue.SimpleQueue[_Item | Callable[[], None] | None] = queue.SimpleQueue()
        self.now = 0
        """rows stored on the caller's thread since start (`write_now`)"""
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0
        """transactions written since start (a bench and the tests read it)"""

    async def write(self, row: Row) -> None:
        """Return once `row` is stored; raise what the store raised for it."""
        if self.try_now(row):
            return
        self._ensure_thread()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.put((row, done, loop))
        await asyncio.shield(done)  # a cancelled request still gets its row stored

    def try_now(self, row: Row) -> bool:
        """Store `row` here and now if that cannot wait (`write_now`, with no row queued
        before it): True once stored; False, nothing stored, when `write` must queue it.
        Raises what the store raised (nothing stored)."""
        if self._write_now is None or not self._queue.empty() or not self._write_now([row]):
            return False
        self.now += 1  # nobody else was writing: stored here, no hand-off each way
        if self._housekeeping is not None and self.now % HOUSEKEEPING_EVERY == 0:
            self._ensure_thread()
            self._queue.put(self._housekeeping)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Store what is queued, then stop the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="ledger-writer",
                                                    daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            if not isinstance(first, tuple):
                _run_job(first)
                continue
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                if not isinstance(item, tuple):
                    _run_job(item)
                    continue
                batch.append(item)
            self._store(batch)

    def _store(self, batch: list[_Item]) -> None:
        outcomes: list[BaseException | None]
        try:
            self._write_many([row for row, _, _ in batch])
            outcomes = [None] * len(batch)
        except Exception as exc:  # noqa: BLE001 - handed to the row's waiter
            if len(batch) == 1:
                outcomes = [exc]
            else:  # one bad row must not fail the others: each alone
                outcomes = []
                for row, _, _ in batch:
                    try:
                        self._write_many([row])
                        outcomes.append(None)
                    except Exception as alone:  # noqa: BLE001 - handed to its waiter
                        outcomes.append(alone)
        self.batches += 1
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None],
                                                            BaseException | None]]] = {}
        for (_, done, loop), outcome in zip(batch, outcomes, strict=True):
            by_loop.setdefault(loop, []).append((done, outcome))
        for loop, waiters in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, waiters)
            except RuntimeError:  # that loop is closed: nobody waits any more
                log.debug("ledger writer: a loop closed before its rows were settled")


def _run_job(job: Callable[[], None]) -> None:
    try:
        job()
    except Exception:
        log.exception("ledger writer: housekeeping failed")


def _settle(waiters: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    for done, outcome in waiters:
        if done.cancelled():
            continue
        if outcome is None:
            done.set_result(None)
        else:
            done.set_exception(outcome)
