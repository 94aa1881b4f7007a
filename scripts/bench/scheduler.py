"""Scheduler decisions per second on a synthetic fleet.

    .venv/bin/python scripts/bench/scheduler.py [--nodes 10000] [--runs 7] [--seed 1] [--freeze]
                                                [--live-only]

Builds a seeded fleet (1-8 GPUs a node, 2-6 models each from a catalog with a
few popular models, some loaded, some queued, four sites) plus two clouds, then
times `schedule` for a few request shapes: median of `--runs` runs, each run a
batch of decisions, timed with time.perf_counter. Prints a table.

Then the live view the coordinator really uses: the same fleet put node by node
into a `FleetIndex` (time per node update, as a telemetry frame costs), and for
each shape a decision with the dispatcher's limit *plus* the index update the
request causes (its in-flight count on the chosen slot goes up, as
`Registry.acquire` does): decisions/s with the view kept current. `agrees`:
how often the live decision's best equals the full ranking's best.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from coordinator.dispatch import LIMIT
from coordinator.fleet_index import FleetIndex
from coordinator.scheduler import (
    Budget,
    CloudView,
    ModelView,
    NodeView,
    Prefer,
    Request,
    Snapshot,
    schedule,
)

GIB = 1024**3
CATALOG = [f"model-{i:02}" for i in range(24)]
WEIGHTS = [1.0 / (i + 1) for i in range(len(CATALOG))]  # a few models are everywhere
SITES = ["site-a", "site-b", "site-c", "site-d"]


def synthetic_node(rng: random.Random, i: int) -> NodeView:
    gpus = rng.randint(1, 8)
    vram = gpus * rng.choice([16, 24, 48, 80]) * GIB
    names = set(rng.choices(CATALOG, weights=WEIGHTS, k=rng.randint(2, 6)))
    models = {}
    for name in sorted(names):
        size = rng.choice([1, 4, 8, 16, 40, 70]) * GIB
        models[name] = ModelView(
            name,
            loaded=rng.random() < 0.4,
            context_length=rng.choice([4096, 8192, 32768, 131072]),
            memory_bytes=size,
            prefill_tps=rng.uniform(200, 8000),
            decode_tps=rng.choice([0.0, rng.uniform(5, 150)]),
            queue_depth=rng.choice([0, 0, 0, 1, 2, 5]),
            in_flight=rng.randint(0, 4),
            load_time_s=size / GIB * rng.uniform(0.2, 1.0),
        )
    return NodeView(
        f"did:key:z6Mk{i:08d}",
        models=models,
        labels={"site": SITES[i % len(SITES)], "tier": rng.choice(["gold", "silver"])},
        connected=rng.random() > 0.02,
        rtt_ms=rng.uniform(1, 120),
        gpu_count=gpus,
        vram_total_bytes=vram,
        vram_free_bytes=int(vram * rng.random()),
        ram_free_bytes=rng.choice([16, 64, 256]) * GIB,
    )


def fleet(n: int, seed: int) -> tuple[list[NodeView], list[CloudView]]:
    rng = random.Random(seed)
    clouds = [
        CloudView("openai", frozenset(CATALOG[:6]), 0.0025, 0.01, 250.0, 80.0, 5000.0),
        CloudView("groq", frozenset(CATALOG[:3]), 0.0005, 0.0008, 150.0, 400.0, 20000.0),
    ]
    return [synthetic_node(rng, i) for i in range(n)], clouds


SHAPES: list[tuple[str, Request, int | None]] = [
    ("popular model, speed", Request(("model-00",), 800, 200), None),
    ("popular model, speed, top 8", Request(("model-00",), 800, 200), 8),
    ("rare model, speed", Request(("model-20",), 800, 200), None),
    ("3-model alias, quality", Request(("model-01", "model-02", "model-03"), 2000, 500,
                                       prefer=Prefer.QUALITY), None),
    ("cost, budget near", Request(("model-00",), 800, 200, prefer=Prefer.COST,
                                  budget_state=Budget.NEAR), None),
    ("residency + label", Request(("model-00",), 800, 200, residency="site-b",
                                  labels={"tier": "gold"}), None),
]


def timed(fn: object, batch: int, runs: int) -> float:
    """Median seconds for one call, over `runs` batches of `batch` calls."""
    assert callable(fn)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - start) / batch)
    return statistics.median(samples)


def live(nodes: list[NodeView], clouds: list[CloudView], runs: int, batch: int) -> None:
    index = FleetIndex(clouds)
    start = time.perf_counter()
    for node in nodes:
        index.put(node)
    put_s = (time.perf_counter() - start) / len(nodes)
    by_did = {n.did: n for n in nodes}
    print(f"\nlive FleetIndex: {put_s * 1e6:.1f} us per node update (a telemetry frame), "
          f"{1 / put_s:,.0f} node updates/s; decisions with limit={LIMIT}, each followed by "
          "the index update of the slot it chose")
    print(f"{'request shape':<30} {'agrees':>7} {'ms/decision':>12} {'p99 ms':>8} "
          f"{'decisions/s':>12}")
    for name, req, _ in SHAPES:
        # the full ranking over the view as it is now (the previous shape moved it)
        full = schedule(req, Snapshot.build(list(by_did.values()), clouds)).best
        got = schedule(req, index, limit=LIMIT).best
        agree = full is not None and got is not None and full[:3] == got[:3]
        samples: list[float] = []
        flip = 0
        for _ in range(runs * batch):
            t0 = time.perf_counter()
            decision = schedule(req, index, limit=LIMIT)
            best = decision.best
            if best is not None and best.kind.value == "node":
                node = by_did[best.target]
                model = node.models[best.model]
                flip ^= 1  # acquire then release on alternate requests: the view moves
                depth = model.queue_depth + (1 if flip else -1)
                changed = replace(model, queue_depth=max(depth, 0), in_flight=max(depth, 0))
                node = replace(node, models={**node.models, best.model: changed})
                by_did[node.did] = node
                index.put(node, (best.model,))
            samples.append(time.perf_counter() - t0)
        samples.sort()
        mean = statistics.fmean(samples)
        p99 = samples[int(len(samples) * 0.99)]
        print(f"{name:<30} {'yes' if agree else 'no':>7} {mean * 1000:>12.3f} {p99 * 1000:>8.3f} "
              f"{1 / mean:>12,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--live-only", action="store_true", help="skip the full rankings")
    parser.add_argument("--freeze", action="store_true",
                        help="gc.freeze() after building the snapshot, so the collector "
                             "stops re-scanning the fleet while decisions allocate")
    args = parser.parse_args()

    nodes, clouds = fleet(args.nodes, args.seed)
    if args.live_only:
        live(nodes, clouds, args.runs, args.batch)
        return
    build_s = timed(lambda: Snapshot.build(nodes, clouds), 1, 3)
    snap = Snapshot.build(nodes, clouds)
    if args.freeze:
        gc.collect()
        gc.freeze()
    print(f"{args.nodes} nodes, {sum(len(n.models) for n in nodes)} node-models; "
          f"Snapshot.build {build_s * 1000:.1f} ms (median of 3); gc frozen: {args.freeze}")
    print(f"{'request shape':<30} {'looked at':>9} {'ranked':>7} {'ms/decision':>12} "
          f"{'decisions/s':>12}")
    for name, req, limit in SHAPES:
        decision = schedule(req, snap, limit=limit)
        seen = len(decision.candidates) + decision.omitted + len(decision.rejected)
        ranked = len(decision.candidates) + decision.omitted
        per = timed(lambda r=req, lim=limit: schedule(r, snap, limit=lim), args.batch, args.runs)
        print(f"{name:<30} {seen:>9} {ranked:>7} {per * 1000:>12.3f} {1 / per:>12,.0f}")
    live(nodes, clouds, args.runs, args.batch)


if __name__ == "__main__":
    main()
