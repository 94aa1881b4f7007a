"""Routing quality: a discrete-event simulation of a heterogeneous fleet with cold loads.

    .venv/bin/python scripts/bench/routing_sim.py [--seconds 900] [--seed 1] [--rate 6]

No sockets, no clock: an event queue. Four policies route the same arrivals:
random, round-robin, least-outstanding-requests (each over the nodes that have
the model on disk) and meshgate (the real `coordinator.scheduler.schedule`
over a `Snapshot` of the simulated fleet at that instant, `limit=1`).

- Fleet ("mixed"): 4 H100-class boxes (8 parallel slots, 2,000 tok/s
  prefill and 45 tok/s decode per stream), 16 RTX 4090-class (4 slots,
  1,200 / 25 tok/s), 24 CPU-only boxes (1 slot, 60 / 6 tok/s). Three models;
  some are loaded on some boxes and only on disk elsewhere; a cold load takes
  the model's real-ish load time (GPU 4-8 s, CPU 12-20 s) before anything
  runs, then the model stays loaded. "uniform": 24 4090-class boxes, every
  model loaded everywhere.
- Load: Poisson arrivals at `--rate`/s with bursts at 3x for 20 s of every
  60 s; 60% / 30% / 10% of requests per model; prompts lognormal around 400
  tokens, outputs 32, 128 or 512 tokens.
- A request waits for a free slot of its model on its node (FIFO), then takes
  prompt/prefill + output/decode seconds. Reported: latency and time to first
  token p50/p99, completed requests/s, cold loads triggered.

What it does not model: rates falling with concurrency on one box, eviction,
the network, failures, telemetry lag (the scheduler sees the exact state).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from coordinator.scheduler import ModelView, NodeView, Request, Snapshot, schedule

GIB = 1 << 30
MODELS = {"llama-8b": (5 * GIB, 0.6), "qwen-14b": (9 * GIB, 0.3), "mistral-7b": (5 * GIB, 0.1)}
CLASSES = {  # slots, prefill tok/s, decode tok/s per stream, load seconds (min, max), gpus
    "h100": (8, 2000.0, 45.0, (4.0, 6.0), 1),
    "4090": (4, 1200.0, 25.0, (5.0, 8.0), 1),
    "cpu": (1, 60.0, 6.0, (12.0, 20.0), 0),
}


@dataclass
class Slot:
    loaded: bool
    ready_at: float = 0.0  # a load in progress ends then
    running: int = 0
    queue: deque[tuple[float, int, int]] = field(default_factory=deque)


@dataclass
class Node:
    did: str
    kind: str
    slots: dict[str, Slot]
    load_s: dict[str, float]

    @property
    def capacity(self) -> int:
        return CLASSES[self.kind][0]

    def outstanding(self, model: str) -> int:
        s = self.slots[model]
        return s.running + len(s.queue)


def build(fleet: str, rng: random.Random) -> list[Node]:
    nodes: list[Node] = []
    if fleet == "uniform":
        plan = [("4090", dict.fromkeys(MODELS, True)) for _ in range(24)]
    else:
        plan = []
        for i in range(4):
            plan.append(("h100", {"llama-8b": True, "qwen-14b": i < 2, "mistral-7b": False}))
        for i in range(16):
            plan.append(("4090", {"llama-8b": i < 8, "qwen-14b": i % 4 == 0,
                                  "mistral-7b": i % 8 == 1}))
        for i in range(24):
            plan.append(("cpu", {"llama-8b": i < 12, "qwen-14b": False,
                                 "mistral-7b": i < 6}))
    for i, (kind, loaded) in enumerate(plan):
        lo, hi = CLASSES[kind][3]
        load_s = {m: rng.uniform(lo, hi) * (1.6 if m == "qwen-14b" else 1.0) for m in MODELS}
        nodes.append(Node(f"{kind}-{i:02}", kind, {m: Slot(v) for m, v in loaded.items()},
                          load_s))
    return nodes


def arrivals(seconds: float, rate: float, rng: random.Random) -> list[tuple[float, str, int, int]]:
    out, t = [], 0.0
    names, weights = list(MODELS), [w for _, w in MODELS.values()]
    while True:
        burst = (t % 60.0) < 20.0
        t += rng.expovariate(rate * (3.0 if burst else 1.0))
        if t >= seconds:
            return out
        prompt = int(min(4000, rng.lognormvariate(math.log(400), 0.8)))
        out.append((t, rng.choices(names, weights)[0], prompt, rng.choice([32, 128, 512])))


def view(node: Node, now: float) -> NodeView:
    slots, prefill, decode, _, gpus = CLASSES[node.kind]
    models = {}
    for m, s in node.slots.items():
        ready = s.loaded and now >= s.ready_at
        models[m] = ModelView(
            m, loaded=ready, context_length=8192, memory_bytes=MODELS[m][0],
            prefill_tps=prefill, decode_tps=decode, queue_depth=s.running + len(s.queue),
            in_flight=s.running, capacity=slots,
            load_time_s=max(s.ready_at - now, 0.0) if s.loaded else node.load_s[m])
    return NodeView(node.did, models=models, gpu_count=gpus, vram_free_bytes=64 * GIB,
                    ram_free_bytes=64 * GIB, rtt_ms=5.0)


def simulate(policy: str, fleet: str, seconds: float, rate: float, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    nodes = build(fleet, rng)
    events: list[tuple[float, int, str, tuple[int, ...]]] = []
    seq = itertools.count()
    for t, model, prompt, out in arrivals(seconds, rate, random.Random(seed + 1)):
        heapq.heappush(events, (t, next(seq), "arrive", (list(MODELS).index(model), prompt, out)))
    rr = itertools.count()
    pick_rng = random.Random(seed + 2)
    lat: list[float] = []
    ttft: list[float] = []
    cold = 0
    done_at = 0.0

    def start(node: Node, model: str, now: float) -> None:
        s = node.slots[model]
        if not s.loaded or now < s.ready_at:
            return
        _, prefill, decode, _, _ = CLASSES[node.kind]
        while s.running < node.capacity and s.queue:
            arrived, prompt, out = s.queue.popleft()
            s.running += 1
            first = now + prompt / prefill
            ttft.append(first - arrived)
            heapq.heappush(events, (first + out / decode, next(seq), "finish",
                                    (nodes.index(node), list(MODELS).index(model),
                                     int(arrived * 1e6))))

    while events:
        now, _, kind, data = heapq.heappop(events)
        if kind == "arrive":
            mi, prompt, out = data
            model = list(MODELS)[mi]
            able = [n for n in nodes if model in n.slots]
            if policy == "random":
                node = pick_rng.choice(able)
            elif policy == "round-robin":
                node = able[next(rr) % len(able)]
            elif policy == "least-outstanding":
                node = min(able, key=lambda n: n.outstanding(model))
            else:
                snap = Snapshot.build([view(n, now) for n in able])
                best = schedule(Request((model,), prompt, out), snap, limit=1).best
                assert best is not None
                node = next(n for n in able if n.did == best.target)
            s = node.slots[model]
            if not s.loaded:
                s.loaded, s.ready_at = True, now + node.load_s[model]
                cold += 1
                heapq.heappush(events, (s.ready_at, next(seq), "loaded",
                                        (nodes.index(node), mi)))
            s.queue.append((now, prompt, out))
            start(node, model, now)
        elif kind == "loaded":
            start(nodes[data[0]], list(MODELS)[data[1]], now)
        else:
            node, model = nodes[data[0]], list(MODELS)[data[1]]
            node.slots[model].running -= 1
            lat.append(now - data[2] / 1e6)
            done_at = now
            start(node, model, now)
    lat.sort()
    ttft.sort()

    def q(xs: list[float], p: float) -> float:
        return xs[min(int(len(xs) * p), len(xs) - 1)]

    return {"p50_s": q(lat, 0.5), "p99_s": q(lat, 0.99), "ttft_p50_s": q(ttft, 0.5),
            "ttft_p99_s": q(ttft, 0.99), "rps": len(lat) / done_at, "cold": cold,
            "n": len(lat)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=900.0)
    parser.add_argument("--rate", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    for fleet in ("mixed", "uniform"):
        print(f"\n{fleet} fleet, {args.rate:g} req/s base (3x bursts), {args.seconds:g} s, "
              f"seed {args.seed}")
        print("| policy | p50 s | p99 s | TTFT p50 s | TTFT p99 s | completed/s | cold loads |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for policy in ("random", "round-robin", "least-outstanding", "meshgate"):
            r = simulate(policy, fleet, args.seconds, args.rate, args.seed)
            print(f"| {policy} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['ttft_p50_s']:.2f} | "
                  f"{r['ttft_p99_s']:.2f} | {r['rps']:.2f} | {r['cold']} |")


if __name__ == "__main__":
    main()
