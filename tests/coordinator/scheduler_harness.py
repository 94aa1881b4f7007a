"""Builders for the scheduler tests: views with sane defaults, one decision, its order."""

from __future__ import annotations

from typing import Any

from coordinator.scheduler import (
    CloudView,
    Decision,
    ModelView,
    NodeView,
    Request,
    Snapshot,
    schedule,
)
from coordinator.scheduler_rules import GIB

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
