"""Money: what a request cost, what each key has spent, and where its budget stands.

A key may have a budget per UTC day and/or per UTC calendar month (its
scopes). `BudgetTracker.budget_for(key_id)` turns the key's spend into the
scheduler's `Budget`:

- `ok`   below `NEAR_FRACTION` (80 %) of every budget;
- `near` at or past 80 % of one: the scheduler puts every local node before
  any paid cloud, whatever the request's policy;
- `over` at or past 100 %: clouds are refused; local nodes (free) keep
  serving. When nothing local can serve, `refusal()` is the clear error (402).

Spend comes from the usage ledger in one grouped query (`Store.spend_by_key`)
at most every `ttl_s` seconds and whenever a UTC day or month begins; between
refreshes each recorded cost is added to the cached figure (`add`), so no
request waits on the database for its budget but the one that finds the
figures stale. That request awaits `refresh_for` before its admission: the
query (which first waits for the ledger writer: read-your-writes) runs in a
thread, once for every request waiting on it, and the event loop serves the
others meanwhile. A cost counted while the query runs is added to its result,
so none is missed; one whose row the query also saw (counted in the moment
between the refresh's start and its wait for the writer) counts twice until
the next refresh: budgets may err early, never late.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from coordinator.scheduler_rules import Budget
from coordinator.store import KeyScopes
from meshgate.openai import OpenAIError

NEAR_FRACTION = 0.8
SPEND_TTL_S = 30.0

SpendQuery = Callable[[float, float], dict[str, tuple[float, float]]]
"""(day_start, month_start) -> key id -> (spent today, spent this month); blocking."""


def cost_of(
    prompt_tokens: int,
    completion_tokens: int,
    price_prompt_per_1k: float,
    price_completion_per_1k: float,
) -> float:
    """What a request cost at an upstream's prices per 1,000 tokens (a node costs 0)."""
    prompt = prompt_tokens * price_prompt_per_1k
    return (prompt + completion_tokens * price_completion_per_1k) / 1000


def period_starts(now: float) -> tuple[float, float]:
    """The start of `now`'s UTC day and UTC month, as timestamps."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp(), day.replace(day=1).timestamp()


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    key_id: str
    state: Budget
    spent_day: float
    spent_month: float
    budget_day: float | None
    budget_month: float | None

    def describe(self) -> str:
        parts = []
        if self.budget_day is not None:
            parts.append(f"{self.spent_day:.4f} of {self.budget_day:g} today (UTC)")
        if self.budget_month is not None:
            parts.append(f"{self.spent_month:.4f} of {self.budget_month:g} this month")
        return "; ".join(parts) or "no budget"


def budget_state(
    scopes: KeyScopes | None, spent_day: float, spent_month: float, near: float = NEAR_FRACTION
) -> Budget:
    if scopes is None:
        return Budget.OK
    ratios = [
        spent / limit
        for spent, limit in ((spent_day, scopes.budget_day), (spent_month, scopes.budget_month))
        if limit is not None
    ]
    worst = max(ratios, default=0.0)
    if worst >= 1.0:
        return Budget.OVER
    return Budget.NEAR if worst >= near else Budget.OK


class BudgetTracker:
    """Cached spend per key; `budget_for` is memory-only, `refresh_for` rereads the ledger."""

    def __init__(
        self,
        spend: SpendQuery,
        *,
        clock: Callable[[], float] = time.time,
        ttl_s: float = SPEND_TTL_S,
        near: float = NEAR_FRACTION,
    ) -> None:
        self._spend_query = spend
        self._clock = clock
        self.ttl_s = ttl_s
        self.near = near
        self._scopes: dict[str, KeyScopes] = {}
        self._spent: dict[str, tuple[float, float]] = {}
        self._periods: tuple[float, float] = (0.0, 0.0)
        self._fetched_at: float | None = None
        self._lock = threading.Lock()
        self._during: dict[str, float] | None = None  # costs counted while a query runs
        self._refreshing: asyncio.Future[None] | None = None
        self.refreshes = 0

    def remember(self, key_id: str, scopes: KeyScopes) -> None:
        """The key's current scopes (its budgets); the API calls this when it authenticates."""
        self._scopes[key_id] = scopes

    def stale(self) -> bool:
        now = self._clock()
        return (
            self._fetched_at is None
            or now - self._fetched_at >= self.ttl_s
            or period_starts(now) != self._periods
        )

    def refresh(self) -> None:
        """Reload every key's spend from the ledger (blocking: one grouped query; a
        thread's job, `refresh_for`). Costs counted meanwhile are added to its result."""
        now = self._clock()
        periods = period_starts(now)
        with self._lock:
            self._during = {}
        try:
            spent = self._spend_query(*periods)
        except BaseException:
            with self._lock:
                self._during = None
            raise
        with self._lock:  # one hold: no cost counted between the merge and the swap
            during, self._during = self._during or {}, None
            for key_id, cost in during.items():
                day, month = spent.get(key_id, (0.0, 0.0))
                spent[key_id] = (day + cost, month + cost)
            self._spent = spent
            self._periods = periods
            self._fetched_at = now
            self.refreshes += 1

    def refresh_for(self, key_id: str) -> asyncio.Future[None] | None:
        """What the admission of a request for `key_id` awaits first (on the event loop):
        None when the key has no budget or the figures are fresh; else the refresh in a
        thread, one for every caller (a failed query raises in each)."""
        scopes = self._scopes.get(key_id)
        if scopes is None or (scopes.budget_day is None and scopes.budget_month is None):
            return None
        if self._refreshing is None:
            if not self.stale():
                return None
            self._refreshing = asyncio.ensure_future(asyncio.to_thread(self.refresh))
            self._refreshing.add_done_callback(self._refreshed)
        return asyncio.shield(self._refreshing)

    def _refreshed(self, task: asyncio.Future[None]) -> None:
        self._refreshing = None
        if not task.cancelled():
            task.exception()  # raised in the requests that awaited it (a 503); retrieved here

    def add(self, key_id: str | None, cost: float) -> None:
        """Count a cost just recorded in the ledger until the next refresh reads it back."""
        if key_id is None or cost <= 0:
            return
        with self._lock:
            day, month = self._spent.get(key_id, (0.0, 0.0))
            self._spent[key_id] = (day + cost, month + cost)
            if self._during is not None:
                self._during[key_id] = self._during.get(key_id, 0.0) + cost

    def status(self, key_id: str) -> BudgetStatus:
        """The key's spend and budget state from memory: the last refresh and the costs
        counted since (`refresh_for` keeps them fresh)."""
        scopes = self._scopes.get(key_id)
        day, month = self._spent.get(key_id, (0.0, 0.0))
        return BudgetStatus(
            key_id,
            budget_state(scopes, day, month, self.near),
            day,
            month,
            scopes.budget_day if scopes else None,
            scopes.budget_month if scopes else None,
        )

    def budget_for(self, key_id: str | None) -> Budget:
        """The scheduler's Budget for this key now (ok when it has no budget)."""
        if key_id is None:
            return Budget.OK
        scopes = self._scopes.get(key_id)
        if scopes is None or (scopes.budget_day is None and scopes.budget_month is None):
            return Budget.OK
        return self.status(key_id).state

    def refusal(self, key_id: str, model: str) -> OpenAIError:
        """The 402 for a request that only a paid cloud could serve, on a spent budget."""
        status = self.status(key_id)
        return OpenAIError(
            402,
            f"the budget of this API key is spent ({status.describe()}), so paid cloud "
            f"upstreams are refused; no local node can serve '{model}' right now",
            code="budget_exceeded",
            hop="coordinator",
        )
