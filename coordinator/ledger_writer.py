"""Ledger rows written by one thread, many rows per transaction (group commit).

A request's ledger row is durable before its answer's last byte leaves (issue 9: a
coordinator killed the moment an answer was read has its row): journaled (the server's
way, below and ledger_journal.py) or, without a journal, stored. Writing each
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

With a journal (ledger_journal.py) the answer waits for neither: `append` writes the row
to the journal (one ``os.write``: the same promise as above, the page cache) and queues
it; the thread waits up to ``linger_s`` for more rows, then commits them with the
journal's mark in one transaction (`write_journaled`) and lets the journal drop what is
committed. `flush` returns once every row journaled before it was called is committed:
whatever reads the ledger in this process calls it first (`LedgerStore.ledger_barrier`),
so it reads its own writes. A journal write that fails (a full disk) sends that row and
every later one the way without a journal, committed before the answer, and says so once.
A journaled row the store refuses even alone is logged with its values and passed over,
as `ApiContext.commit` does for a row stored before its answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from coordinator.ledger_journal import LedgerJournal, Marks
from meshgate.bounds import clip

log = logging.getLogger(__name__)

MAX_BATCH = 512
"""Rows per transaction at most (bounds one commit's time under a burst)."""
HOUSEKEEPING_EVERY = 256
"""Rows stored by `write_now` between two housekeeping jobs on the thread (a WAL
checkpoint: the loop's own connection never checkpoints)."""
LINGER_S = 0.05
"""How long the thread waits after a journaled row for more before it commits, so that
requests one after another share a commit (the answer waits for none; a read of the
ledger cuts it short with `flush`). Measured (request_cpu.py against main, load 5-7):
2 ms: +0.19 ms coordinator CPU a non-stream request (a thread wake-up and a commit per
request); 50 ms: -0.03 ms (about ten rows a commit at one request every 4-8 ms)."""
FLUSH_TIMEOUT_S = 10.0
LINGER_ENV = "MESHGATE_LEDGER_LINGER_MS"
"""`LINGER_S` in milliseconds, 0-60000 (the durability tests hold rows in the journal); a
bad value stops the start (`linger_from_env`), as the lag hooks' do."""

Row = dict[str, Any]
_Waited = tuple[Row, asyncio.Future[None], asyncio.AbstractEventLoop]
_Journaled = tuple[int, Row]
_Item = _Waited | _Journaled | Callable[[], None] | None


def linger_from_env(env: Mapping[str, str]) -> float:
    """`LINGER_ENV` in seconds; `LINGER_S` when unset. ValueError, naming the variable and
    the value, when it is not a number of ms from 0 to 60000 (the server's start stops)."""
    text = env.get(LINGER_ENV, "").strip()
    if not text:
        return LINGER_S
    try:
        ms = float(text)
    except ValueError:
        ms = math.nan
    if not 0 <= ms <= 60_000:  # NaN fails this too
        raise ValueError(f"{LINGER_ENV}={text!r}: must be a number of ms from 0 to 60000")
    return ms / 1000


class LedgerWriter:
    """Store rows with `write_many` (blocking, one transaction) on a thread of its own."""

    def __init__(self, write_many: Callable[[list[Row]], None], *,
                 max_batch: int = MAX_BATCH,
                 write_now: Callable[[list[Row]], bool] | None = None,
                 housekeeping: Callable[[], None] | None = None,
                 journal: LedgerJournal | None = None,
                 write_journaled: Callable[[list[Row], Marks], None] | None = None,
                 linger_s: float = LINGER_S) -> None:
        self._write_many = write_many
        self._max_batch = max_batch
        self._write_now = write_now
        self._housekeeping = housekeeping
        self.journal = journal if write_journaled is not None else None
        self.journaling = self.journal is not None
        """False after a failed journal write: each row is then committed before its answer"""
        self._write_journaled = write_journaled
        self.linger_s = linger_s
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self.now = 0
        """rows stored on the caller's thread since start (`write_now`)"""
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._committed = threading.Condition()
        self._hurry = threading.Event()  # a flush waits: no lingering
        self.batches = 0
        """transactions written since start (a bench and the tests read it)"""

    def append(self, row: Row) -> bool:
        """Journal `row` (stamped ``created_at``) and queue it for the thread: True once
        journaled. False, nothing journaled, without a journal or when its write failed
        (logged; the journal is then left for this run): the caller stores it itself."""
        journal = self.journal
        if journal is None or not self.journaling:
            return False
        row["created_at"] = time.time()
        try:
            seq = journal.append(row)
        except OSError as exc:  # a full or failing disk: the caller commits the row instead
            self.journaling = False
            del row["created_at"]
            log.error("LEDGER: the ledger journal %s could not be written (%s); from now on "
                      "each row is committed before its answer", journal.path, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - a value it cannot encode: this row only
            del row["created_at"]
            log.error("LEDGER: a ledger row could not be journaled (%s); it is committed "
                      "before its answer: %s", exc, clip(repr(row), 1000))
            return False
        self._ensure_thread()
        self._queue.put((seq, row))
        return True

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

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Block until every row journaled before this call is committed (any thread,
        the loop's too: the rows are queued already). False when `timeout` passed."""
        journal = self.journal
        if journal is None or journal.committed >= journal.seq:
            return True
        target = journal.seq
        self._hurry.set()
        with self._committed:
            done = self._committed.wait_for(lambda: journal.committed >= target, timeout)
        if not done:
            log.warning("LEDGER: a read waited %.1f s for the journal's rows to be committed "
                        "(%d of %d); it reads without them", timeout, journal.committed, target)
        return done

    def close(self, timeout: float = 10.0) -> None:
        """Store what is queued, then stop the thread (and close the journal)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._hurry.set()
            self._queue.put(None)
            thread.join(timeout)
        if self.journal is not None:
            self.journal.close()

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
            if len(first) == 2 and self.linger_s > 0 and not self._hurry.is_set():
                self._hurry.wait(self.linger_s)  # journaled: nobody waits for the commit
            self._hurry.clear()
            batch: list[_Waited | _Journaled] = [first]
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
            waited = [item for item in batch if len(item) == 3]
            journaled = [item for item in batch if len(item) == 2]
            if waited:
                self._store(waited)
            if journaled:
                self._store_journaled(journaled)

    def _store_journaled(self, batch: list[_Journaled]) -> None:
        """Commit journaled rows with the journal's mark; a row the store refuses alone
        is logged with its values (as `ApiContext.commit` logs one) and passed over."""
        journal, write = self.journal, self._write_journaled
        assert journal is not None
        assert write is not None
        jid = journal.id
        try:
            write([row for _, row in batch], {jid: batch[-1][0]})
        except Exception:  # noqa: BLE001 - each row alone, so one bad row fails alone
            for seq, row in batch:
                try:
                    write([row], {jid: seq})
                except Exception:
                    log.exception("the ledger row of request %s could not be written: %s",
                                  row.get("request_id"), clip(repr(row), 1000))
        self.batches += 1
        journal.release(batch[-1][0])
        with self._committed:
            self._committed.notify_all()

    def _store(self, batch: list[_Waited]) -> None:
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
