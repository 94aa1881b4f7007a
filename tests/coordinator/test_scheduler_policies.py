"""The scheduler's policies and budgets, one test each; determinism, ties, limits."""

from __future__ import annotations

import random
from typing import Any

import pytest

from coordinator.scheduler import (
    Budget,
    CloudView,
    Prefer,
    Snapshot,
    schedule,
)
from tests.coordinator.scheduler_harness import (
    MODEL,
    cloud,
    decide,
    model,
    node,
    order,
    reasons,
    request,
)


def fast_cloud() -> CloudView:
    return cloud(rtt_ms=10.0, decode_tps=1000.0, prefill_tps=100000.0)


def test_speed_picks_the_shortest_estimate_even_in_the_cloud() -> None:
    assert order(decide(node("a"), fast_cloud(), prefer=Prefer.SPEED)) == ["openai", "a"]


def test_by_default_every_node_goes_before_a_faster_cloud_which_stays_the_fallback() -> None:
    assert order(decide(node("a"), fast_cloud())) == ["a", "openai"]


def test_speed_lets_the_edge_win_a_tie_with_the_cloud() -> None:
    same = cloud("aaa", rtt_ms=10.0, prefill_tps=1000.0, decode_tps=50.0)
    assert order(decide(same, node("zzz"), prefer=Prefer.SPEED)) == ["zzz", "aaa"]


def test_local_ranks_no_cloud_while_an_edge_node_can_serve() -> None:
    decision = decide(node("a"), fast_cloud(), prefer=Prefer.LOCAL)
    assert order(decision) == ["a"]
    assert reasons(decision) == {"openai": "policy local: an edge node can serve"}


def test_local_falls_back_to_cloud_when_no_edge_node_can_serve() -> None:
    decision = decide(node("a", connected=False), cloud(), prefer=Prefer.LOCAL)
    assert order(decision) == ["openai"]


def test_local_never_uses_the_cloud_when_residency_is_set() -> None:
    eu = cloud(labels={"residency": "eu"})
    decision = decide(eu, prefer=Prefer.LOCAL, residency="eu")
    assert decision.candidates == []
    assert reasons(decision) == {"openai": "policy local with residency: cloud never used"}


def test_cost_prefers_the_free_edge_over_a_faster_paid_cloud() -> None:
    assert order(decide(fast_cloud(), node("a"), prefer=Prefer.COST)) == ["a", "openai"]


def test_cost_prefers_a_cloud_that_is_cheaper_than_another() -> None:
    cheap, dear = cloud("cheap", price_prompt_per_1k=0.0001), cloud("dear", rtt_ms=1.0)
    assert order(decide(dear, cheap, prefer=Prefer.COST)) == ["cheap", "dear"]


def test_cost_breaks_equal_costs_by_time() -> None:
    slow = node("a", model(decode_tps=10.0))
    assert order(decide(slow, node("b"), prefer=Prefer.COST)) == ["b", "a"]


def test_cost_lets_a_free_cloud_win_on_time() -> None:
    free = cloud(price_prompt_per_1k=0.0, price_completion_per_1k=0.0, rtt_ms=1.0,
                 prefill_tps=1e6, decode_tps=1e4)
    assert order(decide(node("a"), free, prefer=Prefer.COST)) == ["openai", "a"]


def test_quality_prefers_the_earlier_model_over_a_faster_later_one() -> None:
    small = model("qwen-0.5b", decode_tps=500.0)
    decision = decide(node("a", model()), node("b", small),
                      models=(MODEL, "qwen-0.5b"), prefer=Prefer.QUALITY)
    assert [(c.target, c.model, c.preference) for c in decision.candidates] == [
        ("a", MODEL, 0), ("b", "qwen-0.5b", 1)]


def test_quality_breaks_ties_within_a_model_by_time() -> None:
    decision = decide(node("a", model(queue_depth=2)), node("b"), prefer=Prefer.QUALITY)
    assert order(decision) == ["b", "a"]


# --- budget --------------------------------------------------------------------------


def test_a_budget_near_its_end_ranks_every_cloud_after_every_edge_node() -> None:
    slow = node("a", model(decode_tps=1.0))
    decision = decide(slow, fast_cloud(), budget_state=Budget.NEAR)
    assert order(decision) == ["a", "openai"]
    assert "budget near: after every edge node" in decision.candidates[1].reasons


def test_a_budget_near_its_end_still_applies_the_policy_among_clouds() -> None:
    cheap = cloud("cheap", price_prompt_per_1k=0.0)
    decision = decide(cloud("dear"), cheap, node("a"), prefer=Prefer.COST, budget_state="near")
    assert order(decision) == ["a", "cheap", "dear"]


def test_an_exhausted_budget_rejects_every_cloud() -> None:
    decision = decide(node("a"), fast_cloud(), budget_state=Budget.OVER)
    assert order(decision) == ["a"]
    assert reasons(decision) == {"openai": "budget exhausted"}


def test_an_exhausted_budget_with_no_edge_explains_why_nothing_is_left() -> None:
    decision = decide(node("a", connected=False), cloud(), budget_state=Budget.OVER)
    assert decision.best is None
    assert decision.explain() == "1 x node not connected; 1 x budget exhausted"


# --- determinism, ties, limits, validation -------------------------------------------



def test_equal_estimates_are_ordered_by_did() -> None:
    assert order(decide(node("c"), node("a"), node("b"))) == ["a", "b", "c"]


def test_the_same_snapshot_in_any_order_gives_the_same_decision() -> None:
    nodes = [node(f"n{i}", model(queue_depth=i % 3)) for i in range(20)]
    first = schedule(request(), Snapshot.build(nodes, [cloud()]))
    random.Random(7).shuffle(nodes)
    assert schedule(request(), Snapshot.build(nodes, [cloud()])) == first


def test_a_limit_returns_the_best_few_and_counts_the_rest() -> None:
    nodes = [node(f"n{i:02}", model(queue_depth=i)) for i in range(10)]
    snap = Snapshot.build(nodes)
    full = schedule(request(), snap)
    top = schedule(request(), snap, limit=3)
    assert top.candidates == full.candidates[:3]
    assert top.omitted == 7


def test_a_node_serving_two_candidate_models_appears_once_per_model() -> None:
    decision = decide(node("a", model(), model("b")), models=("b", MODEL))
    assert [(c.target, c.model) for c in decision.candidates] == [("a", "b"), ("a", MODEL)]


def test_repeated_candidate_models_count_once() -> None:
    assert request(models=[MODEL, MODEL]).models == (MODEL,)


def test_policy_and_budget_may_be_given_as_plain_strings() -> None:
    req = request(prefer="cost", budget_state="near")
    assert (req.prefer, req.budget_state) == (Prefer.COST, Budget.NEAR)
    with pytest.raises(ValueError, match="'fastest'"):
        request(prefer="fastest")


def test_negative_token_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        request(max_tokens=-1)


def test_a_snapshot_refuses_two_nodes_with_one_did() -> None:
    with pytest.raises(ValueError, match="duplicate did 'a'"):
        Snapshot.build([node("a"), node("a")])


def test_a_request_is_normalized_whatever_it_is_given() -> None:
    from coordinator.scheduler import Request as Req

    names: list[str] = ["a", "b", "a"]
    given: dict[str, Any] = {"prefer": "cost", "budget_state": "near"}  # (as a config says)
    req = Req(models=names, prompt_tokens=1, max_tokens=1, **given)
    assert (req.models, req.prefer, req.budget_state) == (("a", "b"), Prefer.COST, Budget.NEAR)
    one = Req(models=("a",), prompt_tokens=1, max_tokens=1)
    assert (one.models, one.prefer, one.budget_state) == (("a",), Prefer.EDGE, Budget.OK)
    assert Req(models=("a", "a"), prompt_tokens=1, max_tokens=1).models == ("a",)
