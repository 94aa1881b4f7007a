"""What the coordinator's API needs from the rest of it (`ApiContext`): the key check
(a verified key cached `KEY_CACHE_SECONDS`, one verification per key at a time) and the
ledger rows of answers (stored before the answer's last byte; counted after it)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from coordinator.cache import ResponseCache
from coordinator.config import CoordinatorConfig
from coordinator.dispatch import Dispatcher
from coordinator.ledger_journal import LedgerJournal, Marks
from coordinator.ledger_row import fit_row
from coordinator.ledger_writer import LINGER_S, LedgerWriter
from coordinator.limits import KeyGate
from coordinator.metrics import Metrics
from coordinator.registry import Registry
from meshgate.bounds import clip
from meshgate.openai import OpenAIError

log = logging.getLogger(__name__)

KEY_CACHE_SECONDS = 5.0


@dataclass
class ApiContext:
    """What the API needs from the rest of the coordinator."""

    registry: Registry
    verify_key: Callable[[str], str | None]
    """plaintext key -> key id, or None; blocking (runs in a thread)."""
    known_models: Callable[[], set[str]]
    """every model an enrolled node has offered; blocking."""
    record_usage: Callable[[dict[str, Any]], None]
    """one ledger row; blocking."""
    record_usages: Callable[[list[dict[str, Any]]], None] | None = None
    """many ledger rows in one transaction; blocking. None: `record_usage` row by row."""
    record_now: Callable[[list[dict[str, Any]]], bool] | None = None
    """rows stored at once if that cannot wait (False: not stored); see ledger_writer.py"""
    ledger_housekeeping: Callable[[], None] | None = None
    journal: LedgerJournal | None = None
    """rows journaled before the answer and committed after it (ledger_journal.py)"""
    record_journaled: Callable[[list[dict[str, Any]], Marks], None] | None = None
    """journaled rows and the journal's mark in one transaction; blocking"""
    ledger_linger_s: float = LINGER_S
    config: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    dispatcher: Dispatcher | None = None
    gate: KeyGate | None = None
    """scopes (403), rate limits (429) and budgets per key; None: none enforced."""
    metrics: Metrics | None = None
    cache: ResponseCache | None = None
    """responses to deterministic requests (cache.py); None: off."""
    _key_cache: dict[str, tuple[float, str]] = field(default_factory=dict)
    _verifying: dict[str, asyncio.Task[str | None]] = field(default_factory=dict)
    _key_generation: int = 0
    _pending: set[asyncio.Task[None]] = field(default_factory=set)
    _ledger: LedgerWriter | None = None

    async def authenticate(self, request: Request) -> str:
        return await self.authenticate_header(request.headers.get("authorization", ""))

    async def authenticate_header(self, header: str) -> str:
        """The key id of an ``Authorization`` header's key (401 when missing or wrong)."""
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise OpenAIError(401, "missing API key: send 'Authorization: Bearer KEY'",
                              code="invalid_api_key", hop="coordinator")
        key = key.strip()
        now = time.monotonic()
        cached = self._key_cache.get(key)
        if cached and cached[0] > now:
            return cached[1]
        # one verification per key at a time: a burst of requests with a key not cached
        # (500 streams at once, or every 5 s) waits on one thread call, not one each
        pending = self._verifying.get(key)
        if pending is None:
            generation = self._key_generation
            pending = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self.verify_key, key))
            self._verifying[key] = pending

            def done(task: asyncio.Task[str | None]) -> None:
                if self._verifying.get(key) is task:
                    del self._verifying[key]
                if (not task.cancelled() and task.exception() is None
                        and task.result() is not None and generation == self._key_generation):
                    self._key_cache[key] = (now + KEY_CACHE_SECONDS, task.result() or "")

            pending.add_done_callback(done)
        key_id = await asyncio.shield(pending)  # a requester that leaves cancels no one else
        if key_id is None:
            raise OpenAIError(401, "invalid API key", code="invalid_api_key", hop="coordinator")
        return key_id

    def forget_keys(self) -> None:
        """Drop every verified key, so a revoke or rotate holds from the next request
        (a verification in flight is not cached: it may predate the change)."""
        self._key_cache.clear()
        self._verifying.clear()
        self._key_generation += 1

    def __post_init__(self) -> None:
        if self.dispatcher is None:
            self.dispatcher = Dispatcher(self.registry, self.config.dispatch)

    def record(self, row: dict[str, Any]) -> None:
        """Count `row` and write it in the background (see `commit` for the durable way)."""
        task = asyncio.get_running_loop().create_task(self.commit(row))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def commit(self, row: dict[str, Any]) -> None:
        """Write `row` to the ledger, returning once it is journaled or stored: the answer's
        last byte waits on this, so a crash after an answer was delivered loses no row. It
        is counted (the key's token bucket and budget, metrics) in this turn of the loop,
        after the task's own step: the answer's last bytes, written in that step, leave
        first."""
        if self.gate is not None or self.metrics is not None:
            asyncio.get_running_loop().call_soon(self._count, row)
        fitted = fit_row(row)
        writer = self._writer()
        if writer.append(fitted):
            return
        try:
            await writer.write(fitted)
        except Exception:
            log.exception("the ledger row of request %s could not be written: %s",
                          row.get("request_id"), clip(repr(row), 1000))

    def commit_now(self, row: dict[str, Any]) -> bool:
        """`commit` when it needs no wait (a journal, or SQLite with nobody else writing):
        True once the row is journaled or stored and its count scheduled as `commit` does;
        False, nothing done (nor raised: `commit` then writes it, or logs why it cannot)."""
        fitted = fit_row(row)
        writer = self._writer()
        try:
            if not (writer.append(fitted) or writer.try_now(fitted)):
                return False
        except Exception:  # noqa: BLE001 - nothing stored: commit tries again and logs it
            return False
        if self.gate is not None or self.metrics is not None:
            asyncio.get_running_loop().call_soon(self._count, row)
        return True

    def _writer(self) -> LedgerWriter:
        if self._ledger is None:  # rows one at a time unless the store writes them together
            self._ledger = (LedgerWriter(self.record_usages, write_now=self.record_now,
                                         housekeeping=self.ledger_housekeeping,
                                         journal=self.journal,
                                         write_journaled=self.record_journaled,
                                         linger_s=self.ledger_linger_s)
                            if self.record_usages is not None
                            else LedgerWriter(self._row_by_row, max_batch=1))
        return self._ledger

    def _count(self, row: dict[str, Any]) -> None:
        if self.gate is not None:
            self.gate.finish_row(row)
        if self.metrics is not None:
            self.metrics.observe_row(row)

    def _row_by_row(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.record_usage(row)

    def flush_ledger(self) -> None:
        """Block until every row journaled so far is in the store (read-your-writes: the
        store calls this before it reads the ledger; any thread)."""
        if self._ledger is not None:
            self._ledger.flush()

    def close(self) -> None:
        """Store the ledger rows still queued and stop the writer thread (blocking); the
        journal's files go when all its rows are stored."""
        if self._ledger is not None:
            self._ledger.close()
        elif self.journal is not None:  # no row was ever written
            self.journal.close()
