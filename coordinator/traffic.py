"""Traffic over the last hour, in memory: what the web pane's charts and `top` show.

Every ledger row (every outcome, served or refused) is added as it is
recorded. Rows fall into 10-second buckets over a one-hour ring; each bucket
counts requests, errors and tokens and keeps up to `LATENCY_SAMPLES`
latencies for its percentiles. Nothing here is durable: the ledger is.
Thread-safe, since rows are recorded from worker threads.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

BUCKET_S = 10
WINDOW_S = 3600
LATENCY_SAMPLES = 512
RECENT = 25
OK_OUTCOMES = frozenset({"ok", "cache_hit"})


@dataclass
class Bucket:
    start: int
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, ok: bool, tokens: int, latency_ms: float) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        self.tokens += tokens
        if ok and len(self.latencies) < LATENCY_SAMPLES:
            self.latencies.append(latency_ms)


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (q in 0..100), or None with no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class Traffic:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._buckets: deque[Bucket] = deque()
        self._recent: deque[tuple[float, Mapping[str, Any]]] = deque(maxlen=RECENT)
        self._lock = threading.Lock()

    def add(self, row: Mapping[str, Any]) -> None:
        now = self._clock()
        start = int(now // BUCKET_S * BUCKET_S)
        ok = row.get("outcome") in OK_OUTCOMES
        with self._lock:
            if not self._buckets or self._buckets[-1].start != start:
                self._buckets.append(Bucket(start))
            self._buckets[-1].add(ok, int(row.get("completion_tokens") or 0),
                                  float(row.get("latency_ms") or 0.0))
            while self._buckets and self._buckets[0].start <= now - WINDOW_S:
                self._buckets.popleft()
            # the row itself (a ledger row: nobody changes it after it is stored); the pane's
            # entry is made from it when the pane asks, not for every request
            self._recent.appendleft((now, row))

    def _window(self, now: float, seconds: float) -> list[Bucket]:
        with self._lock:
            return [b for b in self._buckets if b.start > now - seconds - BUCKET_S]

    def summary(self, now: float | None = None, seconds: float = 60.0) -> dict[str, Any]:
        """Rates and latency percentiles over the last `seconds`."""
        now = self._clock() if now is None else now
        buckets = self._window(now, seconds)
        span = max(float(BUCKET_S), min(seconds, now - buckets[0].start)) if buckets else seconds
        latencies = [v for b in buckets for v in b.latencies]
        requests = sum(b.requests for b in buckets)
        return {
            "window_s": seconds, "requests": requests,
            "errors": sum(b.errors for b in buckets),
            "requests_per_s": requests / span,
            "tokens_per_s": sum(b.tokens for b in buckets) / span,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
        }

    def series(self, now: float | None = None) -> dict[str, list[Any]]:
        """One point per bucket of the last hour (empty buckets included), for charts."""
        now = self._clock() if now is None else now
        last = int(now // BUCKET_S * BUCKET_S)
        first = last - WINDOW_S + BUCKET_S
        with self._lock:
            by_start = {b.start: b for b in self._buckets}
        out: dict[str, list[Any]] = {k: [] for k in ("t", "rps", "tps", "p50", "p99", "errors")}
        for start in range(first, last + 1, BUCKET_S):
            b = by_start.get(start)
            out["t"].append(start)
            out["rps"].append(b.requests / BUCKET_S if b else 0.0)
            out["tps"].append(b.tokens / BUCKET_S if b else 0.0)
            out["p50"].append(percentile(b.latencies, 50) if b else None)
            out["p99"].append(percentile(b.latencies, 99) if b else None)
            out["errors"].append(b.errors if b else 0)
        return out

    def recent(self) -> list[dict[str, Any]]:
        """The last few finished requests, newest first."""
        with self._lock:
            recent = list(self._recent)
        return [_entry(now, row) for now, row in recent]


def _entry(now: float, row: Mapping[str, Any]) -> dict[str, Any]:
    """The pane's view of a finished request's ledger row."""
    return {
        "at": now, "request_id": row.get("request_id"), "model": row.get("model"),
        "key_id": row.get("key_id"),
        "target": row.get("node_did") or (f"cloud:{row['upstream']}"
                                          if row.get("upstream") else None),
        "outcome": row.get("outcome"),
        "tokens": int(row.get("prompt_tokens") or 0) + int(row.get("completion_tokens") or 0),
        "latency_ms": row.get("latency_ms"),
    }
