"""Scheduler properties: each candidate ranked or rejected, never lost; a stable order."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.scheduler import (
    Budget,
    Candidate,
    CloudView,
    Kind,
    ModelView,
    NodeView,
    Prefer,
    Request,
    Snapshot,
    schedule,
)
from coordinator.scheduler_rules import GIB, rank_key, row

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
