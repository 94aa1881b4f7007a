"""With a `limit`, the windowed walk of the live order returns exactly the full ranking's
best `limit` candidates, whatever the request's shape (prompt, output, labels, residency).

The view's order is by an estimate for a reference request (512 prompt, 256 output
tokens); a request of another shape ranks the slots differently, so the walk goes on
past the window while a slot further down could still beat the best found (the bound in
`scheduler._beyond`). Fleets here are smaller than MAX_WALK windows, so exactness holds.
"""

from __future__ import annotations

import random

import pytest

from coordinator.fleet_index import FleetIndex
from coordinator.scheduler import ModelView, NodeView, Prefer, Request, Snapshot, schedule

MODEL = "m"
SITES = ["a", "b", "c", "d"]


def fleet(n: int, seed: int) -> list[NodeView]:
    rng = random.Random(seed)
    nodes = []
    for i in range(n):
        model = ModelView(
            MODEL, loaded=rng.random() < 0.7, context_length=32768, memory_bytes=1 << 30,
            prefill_tps=rng.choice([rng.uniform(50, 400), rng.uniform(2000, 20000)]),
            decode_tps=rng.uniform(5, 150), queue_depth=rng.choice([0, 0, 1, 3]),
            load_time_s=rng.uniform(1, 30), capacity=rng.choice([1, 2, 4]))
        nodes.append(NodeView(
            f"did:key:z6Mk{i:06d}", models={MODEL: model},
            labels={"site": SITES[i % 4], "tier": rng.choice(["gold", "silver"])},
            rtt_ms=rng.uniform(1, 200), gpu_count=1, vram_total_bytes=8 << 30,
            vram_free_bytes=rng.choice([0, 4 << 30]), suspect=rng.random() < 0.05))
    return nodes


SHAPES = [
    Request((MODEL,), 800, 200, residency="b", labels={"tier": "gold"}),
    Request((MODEL,), 8000, 16),  # prompt-heavy: prefill rate decides
    Request((MODEL,), 16, 2000),  # output-heavy: decode rate decides
    Request((MODEL,), 512, 256, prefer=Prefer.SPEED),  # the reference shape itself
    Request((MODEL,), 3000, 300, labels={"tier": "silver"}),
]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("req", SHAPES)
def test_the_windowed_walk_returns_the_full_rankings_best(req: Request, seed: int) -> None:
    nodes = fleet(400, seed)
    index = FleetIndex()
    for node in nodes:
        index.put(node)
    full = schedule(req, Snapshot.build(nodes, ()))
    for limit in (1, 4, 16):
        live = schedule(req, index, limit=limit)
        assert live.candidates == full.candidates[:limit]
        assert live.omitted + len(live.candidates) + len(live.rejected) >= limit
