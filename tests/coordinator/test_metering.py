"""Costs, spend per key from a real SQLite ledger, and the budget state the scheduler sees."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from coordinator_harness import LOCAL_MODEL, MODEL, coordinator
from sqlalchemy.exc import OperationalError

from coordinator.metering import (
    BudgetStatus,
    BudgetTracker,
    budget_state,
    cost_of,
    period_starts,
)
from coordinator.routing import Prefer
from coordinator.scheduler import CloudView, ModelView, NodeView, Request, Snapshot, schedule
from coordinator.scheduler_rules import Budget
from coordinator.store import KeyScopes, Store, UsageRecord

# 2026-11-24 22:00 UTC: the day began 22 h ago, the month on the 1st
NOW = datetime(2026, 11, 24, 22, 0, tzinfo=UTC).timestamp()
DAY = 86400.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'coordinator.db'}")
    yield s
    s.close()


def spend(store: Store, key: str | None, cost: float, at: float, upstream: str = "openai") -> None:
    store.record_usage(
        UsageRecord(
            request_id=f"r{at}{cost}",
            key_id=key,
            node_did=None,
            upstream=upstream,
            model="m",
            endpoint="chat/completions",
            prompt_tokens=10,
            completion_tokens=10,
            latency_ms=5.0,
            outcome="ok",
            created_at=at,
            cost=cost,
            route="prefer=speed",
        )
    )


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_cost_is_priced_per_thousand_tokens() -> None:
    assert cost_of(1000, 2000, 0.5, 1.5) == pytest.approx(3.5)
    assert cost_of(0, 0, 9, 9) == 0


def test_periods_are_the_utc_day_and_calendar_month() -> None:
    day, month = period_starts(NOW)
    assert datetime.fromtimestamp(day, UTC) == datetime(2026, 11, 24, tzinfo=UTC)
    assert datetime.fromtimestamp(month, UTC) == datetime(2026, 11, 1, tzinfo=UTC)


def test_the_store_sums_spend_per_key_for_today_and_this_month(store: Store) -> None:
    day, month = period_starts(NOW)
    spend(store, "a", 1.0, NOW - 60)
    spend(store, "a", 2.0, day - 60)  # yesterday, this month
    spend(store, "a", 4.0, month - 60)  # last month: not counted
    spend(store, "b", 0.5, NOW)
    spend(store, None, 9.0, NOW)  # no key: not anyone's spend
    assert store.spend_by_key(day, month) == {"a": (1.0, 3.0), "b": (0.0 + 0.5, 0.5)}


@pytest.mark.parametrize(
    ("day", "month", "state"),
    [
        (0.0, 0.0, Budget.OK),
        (0.79, 0.0, Budget.OK),
        (0.8, 0.0, Budget.NEAR),
        (1.0, 0.0, Budget.OVER),
        (0.1, 40.0, Budget.NEAR),
        (0.1, 50.0, Budget.OVER),
    ],
)
def test_the_state_is_the_worst_of_the_day_and_month_budgets(
    day: float, month: float, state: Budget
) -> None:
    assert budget_state(KeyScopes(budget_day=1.0, budget_month=50.0), day, month) == state


async def fresh(tracker: BudgetTracker, key_id: str) -> BudgetStatus:
    """What the API does: await the refresh when the key's figures are stale, then read."""
    refreshing = tracker.refresh_for(key_id)
    if refreshing is not None:
        await refreshing
    return tracker.status(key_id)


async def test_budgets_read_the_ledger_once_per_ttl_and_count_new_costs(store: Store) -> None:
    clock = Clock(NOW)
    tracker = BudgetTracker(store.spend_by_key, clock=clock, ttl_s=30)
    tracker.remember("a", KeyScopes(budget_day=10.0))
    spend(store, "a", 7.0, NOW - 10)
    assert (await fresh(tracker, "a")).state == Budget.OK  # 7 of 10
    assert tracker.refreshes == 1
    tracker.add("a", 1.5)  # 8.5: near, known without the database
    assert tracker.budget_for("a") == Budget.NEAR
    spend(store, "a", 5.0, NOW)  # written by another coordinator
    for _ in range(100):
        assert tracker.refresh_for("a") is None
        tracker.budget_for("a")
    assert tracker.refreshes == 1
    clock.t += 30
    assert tracker.budget_for("a") == Budget.NEAR  # memory only: never a query on the loop
    assert (await fresh(tracker, "a")).state == Budget.OVER  # 12 in the ledger
    assert tracker.refreshes == 2


async def test_a_new_utc_day_resets_the_day_budget_at_once(store: Store) -> None:
    clock = Clock(NOW)
    tracker = BudgetTracker(store.spend_by_key, clock=clock, ttl_s=3600)
    tracker.remember("a", KeyScopes(budget_day=1.0, budget_month=100.0))
    spend(store, "a", 1.0, NOW)
    assert (await fresh(tracker, "a")).state == Budget.OVER
    clock.t = NOW + 2 * 3600 + 1  # 00:00:01 the next day, well inside the ttl
    assert (await fresh(tracker, "a")).state == Budget.OK


def test_a_key_without_a_budget_never_touches_the_ledger() -> None:
    def boom(day: float, month: float) -> dict[str, tuple[float, float]]:
        raise AssertionError("queried")

    tracker = BudgetTracker(boom)
    tracker.remember("a", KeyScopes(rpm=5))
    assert tracker.refresh_for("a") is None
    assert tracker.refresh_for("unknown") is None
    assert tracker.budget_for("a") == Budget.OK
    assert tracker.budget_for("unknown") == Budget.OK
    assert tracker.budget_for(None) == Budget.OK


async def test_the_refusal_is_a_402_that_says_what_was_spent(store: Store) -> None:
    tracker = BudgetTracker(store.spend_by_key, clock=Clock(NOW))
    tracker.remember("a", KeyScopes(budget_month=2.0))
    spend(store, "a", 2.5, NOW - 5 * DAY)
    await fresh(tracker, "a")
    error = tracker.refusal("a", "gpt-4o")
    assert error.status == 402
    assert error.body()["error"]["code"] == "budget_exceeded"
    assert "2.5000 of 2 this month" in error.message
    assert "no local node can serve 'gpt-4o'" in error.message


async def test_a_slow_spend_query_runs_in_a_thread_once_and_misses_no_cost(
        store: Store) -> None:
    """The refresh's query (made slow here: it waits for `release`) does not hold the event
    loop; the requests that find the figures stale share it; a cost counted while it runs
    is added to its result."""
    started, release = threading.Event(), threading.Event()

    def slow(day: float, month: float) -> dict[str, tuple[float, float]]:
        started.set()
        assert release.wait(10)
        return store.spend_by_key(day, month)

    tracker = BudgetTracker(slow, clock=Clock(NOW))
    tracker.remember("a", KeyScopes(budget_day=1.0))
    spend(store, "a", 0.5, NOW)
    first, second = tracker.refresh_for("a"), tracker.refresh_for("a")
    assert first is not None
    assert second is not None
    assert await asyncio.to_thread(started.wait, 10)  # the loop runs while it is held
    assert not first.done()
    tracker.add("a", 0.3)  # a request's cost counted during the query: 0.8, near
    release.set()
    await asyncio.gather(first, second)
    assert tracker.refreshes == 1
    assert tracker.status("a").spent_day == pytest.approx(0.8)
    assert tracker.budget_for("a") == Budget.NEAR
    assert tracker.refresh_for("a") is None


async def test_a_failed_spend_query_raises_in_its_request_and_the_next_one_retries(
        store: Store) -> None:
    calls = []

    def flaky(day: float, month: float) -> dict[str, tuple[float, float]]:
        calls.append(day)
        if len(calls) == 1:
            raise OperationalError("SELECT", {}, Exception("database down"))
        return store.spend_by_key(day, month)

    tracker = BudgetTracker(flaky, clock=Clock(NOW))
    tracker.remember("a", KeyScopes(budget_day=1.0))
    with pytest.raises(OperationalError):  # the API answers it 503 (spool.py)
        await fresh(tracker, "a")
    assert (await fresh(tracker, "a")).state == Budget.OK
    assert (len(calls), tracker.refreshes) == (2, 1)


# ----------------------------------------------------------------------------- over HTTP


async def test_over_http_spend_near_then_past_the_budget_refuses_the_cloud_with_402(
    tmp_path: Path,
) -> None:
    """Each request costs 0.02 at the cloud; the day's budget is 0.024."""
    async with coordinator(tmp_path) as coord:
        key = coord.key(budget_day=0.024)
        coord.ctx.gate.budgets.ttl_s = 3600  # the cache alone must carry the new spend
        first = await coord.chat(key, content="one")
        await coord.settled()
        state_after_one = coord.ctx.gate.budgets.budget_for(key.split("_")[1])
        second = await coord.chat(key, content="two")  # near: no node, so the cloud still
        await coord.settled()
        third = await coord.chat(key, content="three")
        await coord.settled()
        refreshes = coord.ctx.gate.budgets.refreshes
    assert (first.status_code, second.status_code) == (200, 200)
    assert state_after_one == Budget.NEAR
    assert third.status_code == 402
    error = third.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert "0.0400 of 0.024 today" in error["message"]
    assert len(coord.cloud.requests) == 2
    assert refreshes == 1  # one ledger query for three requests
    rows = Store(f"sqlite:///{tmp_path / 'coordinator.db'}").usage_rows()
    assert all(r.route == "qg://prefer=edge" for r in rows)
    assert [(r.outcome, r.upstream, r.cost) for r in rows] == [
        ("ok", "paid", pytest.approx(0.02)),
        ("ok", "paid", pytest.approx(0.02)),
        ("budget_exceeded", None, 0.0),
    ]
    assert all(r.key_id == key.split("_")[1] for r in rows)
    assert rows[0].prompt_tokens == 10
    assert rows[0].completion_tokens == 20
    assert rows[0].latency_ms > 0


def test_the_scheduler_keeps_local_nodes_and_drops_the_cloud_once_over_budget(
    store: Store,
) -> None:
    """budget_for feeds the scheduler: near puts the edge first, over leaves only the edge."""
    snapshot = Snapshot.build(
        [NodeView("did:key:z6MkLOCAL", {"m": ModelView("m", loaded=True, decode_tps=1.0)})],
        [CloudView("paid", frozenset({"m"}), price_completion_per_1k=1.0, decode_tps=1000.0)],
    )
    tracker = BudgetTracker(store.spend_by_key, clock=Clock(NOW))
    tracker.remember("a", KeyScopes(budget_day=1.0))
    kinds = {}
    for spent in (0.0, 0.85, 0.2):
        if spent:
            spend(store, "a", spent, NOW)
            tracker.refresh()
        state = tracker.budget_for("a")
        decision = schedule(
            Request(models=["m"], prompt_tokens=10, max_tokens=100, budget_state=state,
                    prefer=Prefer.SPEED),
            snapshot,
        )
        kinds[state] = [c.kind.value for c in decision.candidates]
    assert kinds[Budget.OK] == ["cloud", "node"]  # speed: the fast cloud first
    assert kinds[Budget.NEAR] == ["node", "cloud"]
    assert kinds[Budget.OVER] == ["node"]


async def test_over_http_a_spent_budget_still_gets_local_nodes_but_not_the_cloud(
    tmp_path: Path,
) -> None:
    async with coordinator(tmp_path) as coord:
        node = await coord.node()
        key = coord.key(budget_month=1.0)
        key_id = key.split("_")[1]
        spend(coord.store, key_id, 1.5, time.time())  # spent already
        local = await coord.chat(key, model=LOCAL_MODEL)
        cloud = await coord.chat(key, model=MODEL)
    assert local.status_code == 200
    assert local.headers["x-meshgate-node"] == node.did
    assert cloud.status_code == 402
    assert "1.5000 of 1 this month" in cloud.json()["error"]["message"]
    assert coord.cloud.requests == []


async def test_over_http_a_slow_budget_refresh_holds_only_its_own_request(
        tmp_path: Path) -> None:
    """The spend refresh waits for the ledger writer, then queries: made slow here (the
    store's read barrier waits for `release`), it delays the budgeted key's request, which
    needs the figures, and no other request."""
    async with coordinator(tmp_path) as coord:
        budgeted, free = coord.key("a", budget_day=1.0), coord.key("b")
        started, release = threading.Event(), threading.Event()
        barrier = coord.store.ledger_barrier

        def slow_barrier() -> None:
            started.set()
            assert release.wait(10)
            barrier()

        coord.store.ledger_barrier = slow_barrier
        waiting = asyncio.create_task(coord.chat(budgeted, content="one"))
        assert await asyncio.to_thread(started.wait, 10)
        other = await coord.chat(free, content="two")  # answered while the query is held
        assert other.status_code == 200
        assert not waiting.done()
        release.set()
        first = await waiting
        await coord.settled()
        budgets = coord.ctx.gate.budgets
        refreshes, spent = budgets.refreshes, budgets.status(budgeted.split("_")[1]).spent_day
    assert first.status_code == 200
    assert refreshes == 1
    assert spent == pytest.approx(0.02)  # its own cost, counted after the refresh
