"""The scheduler: one test per filter, per policy, per tie rule, and a property."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.scheduler import (
    Budget,
    Candidate,
    CloudView,
    Decision,
    Kind,
    ModelView,
    NodeView,
    Prefer,
    Request,
    Snapshot,
    schedule,
)
from coordinator.scheduler_rules import FALLBACK_DECODE_TPS, GIB, rank_key, row

MODEL = "llama-8b"


def model(name: str = MODEL, **kw: Any) -> ModelView:
    base: dict[str, Any] = {
        "loaded": True,
        "context_length": 8192,
        "memory_bytes": 5 * GIB,
        "prefill_tps": 1000.0,
        "decode_tps": 50.0,
        "load_time_s": 10.0,
    }
    return ModelView(name, **(base | kw))


def node(did: str, *models: ModelView, **kw: Any) -> NodeView:
    base: dict[str, Any] = {
        "gpu_count": 1,
        "vram_total_bytes": 24 * GIB,
        "vram_free_bytes": 16 * GIB,
        "ram_free_bytes": 32 * GIB,
        "rtt_ms": 10.0,
    }
    ms = models or (model(),)
    return NodeView(did, models={m.name: m for m in ms}, **(base | kw))


def cloud(name: str = "openai", **kw: Any) -> CloudView:
    base: dict[str, Any] = {
        "models": frozenset({MODEL}),
        "price_prompt_per_1k": 0.001,
        "price_completion_per_1k": 0.002,
        "rtt_ms": 200.0,
        "prefill_tps": 5000.0,
        "decode_tps": 100.0,
    }
    return CloudView(name, **(base | kw))


def request(**kw: Any) -> Request:
    base: dict[str, Any] = {"models": (MODEL,), "prompt_tokens": 1000, "max_tokens": 100}
    return Request(**(base | kw))


def decide(*targets: NodeView | CloudView, **kw: Any) -> Decision:
    nodes = [t for t in targets if isinstance(t, NodeView)]
    clouds = [t for t in targets if isinstance(t, CloudView)]
    return schedule(request(**kw), Snapshot.build(nodes, clouds))


def order(decision: Decision) -> list[str]:
    return [c.target for c in decision.candidates]


def reasons(decision: Decision) -> dict[str, str]:
    return {r.target: r.reason for r in decision.rejected}


# --- the estimate --------------------------------------------------------------------


def test_a_loaded_idle_model_costs_prefill_plus_decode_plus_round_trip() -> None:
    best = decide(node("a")).best
    assert best is not None
    assert best.est_seconds == pytest.approx(1000 / 1000 + 100 / 50 + 0.010)
    assert best.est_cost == 0.0
    assert best.kind is Kind.NODE
    assert "loaded" in best.reasons


def test_an_unloaded_model_adds_its_load_time() -> None:
    best = decide(node("a", model(loaded=False, load_time_s=12.0))).best
    assert best is not None
    assert best.est_seconds == pytest.approx(12.0 + 1.0 + 2.0 + 0.010)
    assert "not loaded: +12.0s to load" in best.reasons


def test_each_queued_request_waits_one_request_time() -> None:
    best = decide(node("a", model(queue_depth=3))).best
    assert best is not None
    assert best.est_seconds == pytest.approx(4 * 3.0 + 0.010)
    assert "queue 3" in best.reasons


def test_a_zero_decode_rate_is_not_a_division_by_zero_but_a_conservative_guess() -> None:
    best = decide(node("a", model(decode_tps=0.0, prefill_tps=math.nan))).best
    assert best is not None
    assert math.isfinite(best.est_seconds)
    assert best.est_seconds == pytest.approx(1000 / 100 + 100 / FALLBACK_DECODE_TPS + 0.010)
    assert any("decode rate unknown" in r for r in best.reasons)
    assert any("prefill rate unknown" in r for r in best.reasons)


def test_a_cloud_costs_its_list_price_for_prompt_and_max_tokens() -> None:
    best = decide(cloud()).best
    assert best is not None
    assert best.kind is Kind.CLOUD
    assert best.est_cost == pytest.approx(1.0 * 0.001 + 0.1 * 0.002)
    assert best.est_seconds == pytest.approx(1000 / 5000 + 100 / 100 + 0.2)


def test_zero_tokens_asked_leaves_only_the_fixed_costs() -> None:
    best = decide(node("a", model(loaded=False)), prompt_tokens=0, max_tokens=0).best
    assert best is not None
    assert best.est_seconds == pytest.approx(10.0 + 0.010)


# --- filters -------------------------------------------------------------------------


def test_a_model_nobody_has_is_rejected_by_name() -> None:
    decision = decide(node("a"), models=("mistral-7b",))
    assert decision.candidates == []
    (rejection,) = decision.rejected
    assert rejection.kind is None
    assert rejection.reason == "no node or cloud has model 'mistral-7b'"


def test_a_disconnected_node_is_rejected() -> None:
    decision = decide(node("a", connected=False), node("b"))
    assert order(decision) == ["b"]
    assert reasons(decision) == {"a": "node not connected"}


def test_an_unloaded_model_that_does_not_fit_in_free_vram_is_rejected() -> None:
    big = model(loaded=False, memory_bytes=20 * GIB)
    decision = decide(node("a", big), node("b", big, vram_free_bytes=22 * GIB))
    assert order(decision) == ["b"]
    assert reasons(decision)["a"] == "does not fit: needs 20.0 GiB, 16.0 GiB VRAM free"


def test_a_loaded_model_is_never_rejected_for_memory() -> None:
    assert order(decide(node("a", model(memory_bytes=99 * GIB), vram_free_bytes=0))) == ["a"]


def test_a_cpu_only_node_fits_models_in_free_ram() -> None:
    big = model(loaded=False, memory_bytes=20 * GIB)
    decision = decide(
        node("a", big, gpu_count=0, vram_free_bytes=0, ram_free_bytes=24 * GIB),
        node("b", big, gpu_count=0, vram_free_bytes=0, ram_free_bytes=8 * GIB),
    )
    assert order(decision) == ["a"]
    assert reasons(decision)["b"] == "does not fit: needs 20.0 GiB, 8.0 GiB RAM free"


def test_prompt_plus_max_tokens_must_fit_the_context() -> None:
    decision = decide(node("a", model(context_length=1100)), node("b", model(context_length=1099)))
    assert order(decision) == ["a"]
    assert reasons(decision)["b"] == "context too small: needs 1100 tokens, model has 1099"


def test_a_cloud_with_a_known_context_is_held_to_it() -> None:
    decision = decide(cloud(context_length=512))
    assert reasons(decision)["openai"] == "context too small: needs 1100 tokens, model has 512"


def test_required_labels_must_all_match() -> None:
    decision = decide(
        node("a", labels={"tier": "gold", "site": "x"}),
        node("b", labels={"tier": "silver"}),
        node("c"),
        labels={"tier": "gold"},
    )
    assert order(decision) == ["a"]
    assert reasons(decision) == {
        "b": "label tier=gold required, has tier=silver",
        "c": "label tier=gold required, has tier=(none)",
    }


def test_residency_matches_the_site_or_residency_label() -> None:
    decision = decide(
        node("a", labels={"site": "site-a"}),
        node("b", labels={"residency": "site-a"}),
        node("c", labels={"site": "site-b"}),
        node("d"),
        residency="site-a",
    )
    assert order(decision) == ["a", "b"]
    assert reasons(decision) == {
        "c": "residency site-a required, is at site-b",
        "d": "residency site-a required, is at (none)",
    }


def test_residency_keeps_data_off_clouds_without_that_label() -> None:
    decision = decide(cloud("us"), cloud("eu", labels={"residency": "eu"}), residency="eu")
    assert order(decision) == ["eu"]
    assert reasons(decision) == {"us": "residency eu required, is at (none)"}


def test_the_first_failing_filter_is_the_reason_given() -> None:
    decision = decide(node("a", model(context_length=10), connected=False))
    assert reasons(decision) == {"a": "node not connected"}


# --- policies ------------------------------------------------------------------------


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


# --- property: every candidate is ranked or rejected, never both, never lost ----------

MODELS = ("m0", "m1", "m2")
rates = st.sampled_from([0.0, 1.0, 10.0, 100.0, 1000.0, math.inf])


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    nodes = []
    for i in range(draw(st.integers(0, 8))):
        names = draw(st.sets(st.sampled_from(MODELS)))
        views = [
            ModelView(m, loaded=draw(st.booleans()), context_length=draw(st.integers(0, 4096)),
                      memory_bytes=draw(st.integers(0, 32)) * GIB, prefill_tps=draw(rates),
                      decode_tps=draw(rates), queue_depth=draw(st.integers(0, 5)),
                      load_time_s=draw(st.floats(0, 60)))
            for m in sorted(names)
        ]
        nodes.append(NodeView(
            f"did:{i}", {v.name: v for v in views},
            labels=draw(st.sampled_from([{}, {"site": "a"}, {"residency": "b", "tier": "x"}])),
            connected=draw(st.booleans()), rtt_ms=draw(st.floats(0, 500)),
            gpu_count=draw(st.integers(0, 8)), vram_free_bytes=draw(st.integers(0, 32)) * GIB,
            ram_free_bytes=draw(st.integers(0, 64)) * GIB))
    clouds = [
        CloudView(f"cloud{i}", frozenset(draw(st.sets(st.sampled_from(MODELS)))),
                  price_prompt_per_1k=draw(st.sampled_from([0.0, 0.001, 0.01])),
                  price_completion_per_1k=draw(st.sampled_from([0.0, 0.002])),
                  rtt_ms=draw(st.floats(0, 500)), decode_tps=draw(rates),
                  context_length=draw(st.sampled_from([None, 2048])),
                  labels=draw(st.sampled_from([{}, {"site": "a"}])))
        for i in range(draw(st.integers(0, 3)))
    ]
    return Snapshot.build(nodes, clouds)


requests = st.builds(
    Request,
    models=st.lists(st.sampled_from((*MODELS, "absent")), max_size=4),
    prompt_tokens=st.integers(0, 3000),
    max_tokens=st.integers(0, 2000),
    prefer=st.sampled_from(Prefer),
    residency=st.sampled_from([None, "a", "b"]),
    labels=st.sampled_from([{}, {"tier": "x"}]),
    budget_state=st.sampled_from(Budget),
)


def pairs(snap: Snapshot, req: Request) -> set[tuple[Kind, str, str]]:
    nodes = {(Kind.NODE, n.did, m) for n in snap.nodes for m in n.models if m in req.models}
    clouds = {(Kind.CLOUD, c.name, m) for c in snap.clouds for m in c.models if m in req.models}
    return nodes | clouds


def key(c: Candidate) -> tuple[Kind, str, str]:
    return (c.kind, c.target, c.model)


@settings(max_examples=300, deadline=None)
@given(snap=snapshots(), req=requests)
def test_every_candidate_is_either_ranked_or_rejected_with_a_reason(
    snap: Snapshot, req: Request
) -> None:
    decision = schedule(req, snap)
    ranked = [key(c) for c in decision.candidates]
    rejected = [(r.kind, r.target, r.model) for r in decision.rejected if r.kind is not None]
    assert len(set(ranked)) == len(ranked)
    assert len(set(rejected)) == len(rejected)
    assert set(ranked).isdisjoint(rejected)
    assert set(ranked) | set(rejected) == pairs(snap, req)
    assert all(r.reason for r in decision.rejected)
    assert all(math.isfinite(c.est_seconds) and c.est_seconds >= 0 for c in decision.candidates)


@settings(max_examples=200, deadline=None)
@given(snap=snapshots(), req=requests, seed=st.integers(0, 2**16))
def test_the_ranking_is_sorted_stable_and_independent_of_snapshot_order(
    snap: Snapshot, req: Request, seed: int
) -> None:
    decision = schedule(req, snap)
    keys = [rank_key(req)(row(c)) for c in decision.candidates]
    assert keys == sorted(keys)
    nodes, clouds = list(snap.nodes), list(snap.clouds)
    random.Random(seed).shuffle(nodes)
    random.Random(seed).shuffle(clouds)
    assert schedule(req, Snapshot.build(nodes, clouds)) == decision
    if req.budget_state is Budget.NEAR:
        kinds = [c.kind for c in decision.candidates]
        assert kinds == sorted(kinds, key=lambda k: k is Kind.CLOUD)
    if req.budget_state is Budget.OVER or (req.prefer is Prefer.LOCAL and req.residency):
        assert all(c.kind is Kind.NODE for c in decision.candidates)
    limited = schedule(req, snap, limit=2)
    assert limited.candidates == decision.candidates[:2]
    assert limited.omitted == max(len(decision.candidates) - 2, 0)
