"""Flood control for both daemons' logs: a storm of one kind of line is counted, not written.

An overloaded daemon (file descriptors exhausted, a node hammering a refusal,
every request failing the same way) would otherwise write the same line
hundreds of thousands of times a minute and fill the disk. :class:`FloodFilter`
sits on the log handler and keeps one token bucket per kind of line (logger,
level and message template, so ``"request %s failed"`` is one kind whatever
the id), plus one for all lines together:

- a kind may write ``burst`` lines at once and ``rate`` lines a second after;
- all kinds together may write ``total_burst`` at once and ``total_rate`` a
  second after;
- what is dropped is counted, and said: the next line of that kind that is
  written carries ``(N similar lines dropped)``, and a kind that went quiet
  with drops still unsaid gets a summary line within ``report_every`` seconds
  (written by the next line of any kind to pass).

Errors and warnings are limited like everything else: in a storm, one of each
kind a second is enough to diagnose it.

Access lines (INFO lines of the loggers in ``exempt``: ``meshgate.access``, one line
per HTTP request answered) are not limited and take no tokens from the total: an
operator reads the access log as a record of every request, and the requests it
counts are bounded already (the HTTP server's connection limits, the keys' rate
limits). ``--no-access-log`` turns them off instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ACCESS_LOGGERS", "FloodFilter", "install_flood_filter"]

Key = tuple[str, int, str]
ACCESS_LOGGERS = frozenset({"meshgate.access"})
"""Loggers whose INFO lines are never limited (see the module doc)."""
MAX_KINDS = 1000
"""Kinds of line remembered; past it, the idlest are forgotten (a message template
that embeds peer data would otherwise make every line a kind of its own)."""


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    dropped: int = 0
    first_drop: float = 0.0


class FloodFilter(logging.Filter):
    def __init__(self, *, rate: float = 10.0, burst: float = 50.0, total_rate: float = 200.0,
                 total_burst: float = 1000.0, report_every: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 exempt: frozenset[str] = ACCESS_LOGGERS) -> None:
        super().__init__()
        self.exempt = exempt
        self.rate, self.burst = rate, burst
        self.total_rate, self.total_burst = total_rate, total_burst
        self.report_every = report_every
        self.clock = clock
        self.dropped_total = 0
        self._kinds: dict[Key, _Bucket] = {}
        self._total = _Bucket(total_burst, clock())
        self._lock = threading.Lock()
        self._reporting = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.INFO and record.name in self.exempt:
            return True  # an access line: neither limited nor counted in the total
        if getattr(self._reporting, "on", False):
            return True  # our own summary lines
        key: Key = (record.name, record.levelno, str(record.msg)[:200])
        now = self.clock()
        with self._lock:
            bucket = self._kinds.get(key)
            if bucket is None:
                if len(self._kinds) >= MAX_KINDS:
                    self._forget_idle(now)
                bucket = self._kinds[key] = _Bucket(self.burst, now)
            passed = _take(bucket, now, self.rate, self.burst) and _take(
                self._total, now, self.total_rate, self.total_burst)
            if not passed:
                bucket.dropped += 1
                if bucket.dropped == 1:
                    bucket.first_drop = now
                self.dropped_total += 1
                return False
            dropped, bucket.dropped = bucket.dropped, 0
            stale = self._stale(now, key)
        if dropped:
            record.msg = f"{record.getMessage()} ({dropped} similar lines dropped)"
            record.args = None
        if stale:
            self._report(stale)
        return True

    def drops(self, name: str, levelno: int, msg: str) -> bool:
        """Whether `filter` would drop a record of this kind now; if so it is dropped here,
        counted as `filter` counts it, so a caller with a line per request need not make
        the record. False changes nothing: the record then goes through `filter`."""
        if levelno <= logging.INFO and name in self.exempt:
            return False
        key: Key = (name, levelno, msg[:200])
        now = self.clock()
        with self._lock:
            bucket = self._kinds.get(key)
            if bucket is None or getattr(self._reporting, "on", False):
                return False
            if _full(bucket, now, self.rate, self.burst) and _full(
                    self._total, now, self.total_rate, self.total_burst):
                return False  # it would pass: left to filter, which takes the tokens
            if _take(bucket, now, self.rate, self.burst):  # as filter: the kind's, then
                _take(self._total, now, self.total_rate, self.total_burst)  # the total's
            bucket.dropped += 1
            if bucket.dropped == 1:
                bucket.first_drop = now
            self.dropped_total += 1
            return True

    def _stale(self, now: float, skip: Key) -> list[tuple[Key, int, float]]:
        """Kinds with drops not yet said for `report_every` seconds (their counts reset)."""
        out = []
        for key, bucket in self._kinds.items():
            if key != skip and bucket.dropped and now - bucket.first_drop >= self.report_every:
                out.append((key, bucket.dropped, now - bucket.first_drop))
                bucket.dropped = 0
        return out

    def _report(self, stale: list[tuple[Key, int, float]]) -> None:
        log = logging.getLogger("meshgate.logflood")
        self._reporting.on = True
        try:
            for (name, level, template), count, seconds in stale:
                log.warning("log flood: dropped %d lines of %s %s %r in %.0f s", count,
                            logging.getLevelName(level), name, template[:120], seconds)
        finally:
            self._reporting.on = False

    def _forget_idle(self, now: float) -> None:
        """Drop the kinds whose buckets are full again (idle), or the oldest half."""
        idle = [k for k, b in self._kinds.items()
                if not b.dropped and b.tokens + (now - b.stamp) * self.rate >= self.burst]
        for key in idle or list(self._kinds)[: len(self._kinds) // 2]:
            self._kinds.pop(key, None)


def _full(bucket: _Bucket, now: float, rate: float, burst: float) -> bool:
    """Whether `_take` would take a token (and nothing taken)."""
    return min(burst, bucket.tokens + (now - bucket.stamp) * rate) >= 1


def _take(bucket: _Bucket, now: float, rate: float, burst: float) -> bool:
    bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
    bucket.stamp = now
    if bucket.tokens >= 1:
        bucket.tokens -= 1
        return True
    return False


def install_flood_filter(flood: FloodFilter | None = None) -> FloodFilter:
    """Put one FloodFilter on every handler configured now (the root logger's and those of
    loggers with their own, like uvicorn's); call it after logging is set up. Returns it."""
    flood = flood or FloodFilter()
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if not any(isinstance(f, FloodFilter) for f in handler.filters):
            handler.addFilter(flood)
    return flood
