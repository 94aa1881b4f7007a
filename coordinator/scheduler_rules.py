"""The scheduler's rules: filters that say why, estimates, and the ranking keys.

Everything here is a small pure function of the snapshot's views and the
request; `scheduler.py` only walks the candidates through them. The rules are
written out in `SCHEDULER.md`; keep the two in step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

from coordinator.routing import Prefer

if TYPE_CHECKING:
    from coordinator.scheduler import Candidate, CloudView, ModelView, NodeView, Request

# A rate of zero, negative or not finite means "not measured yet": assume these.
FALLBACK_PREFILL_TPS = 100.0
FALLBACK_DECODE_TPS = 5.0
RESIDENCY_LABELS = ("site", "residency")
GIB = 1024**3
T = TypeVar("T")


class Kind(StrEnum):
    NODE = "node"
    CLOUD = "cloud"


class Budget(StrEnum):
    OK = "ok"
    NEAR = "near"
    OVER = "over"


KIND_RANK = {Kind.NODE: 0, Kind.CLOUD: 1}


def seconds_per_token(rate: float, fallback: float) -> float:
    return 1.0 / rate if rate > 0 and math.isfinite(rate) else 1.0 / fallback


def rate_notes(prefill_tps: float, decode_tps: float) -> tuple[str, ...]:
    notes = []
    if not (prefill_tps > 0 and math.isfinite(prefill_tps)):
        notes.append(f"prefill rate unknown, assumed {FALLBACK_PREFILL_TPS:g} tok/s")
    if not (decode_tps > 0 and math.isfinite(decode_tps)):
        notes.append(f"decode rate unknown, assumed {FALLBACK_DECODE_TPS:g} tok/s")
    return tuple(notes)


@dataclass(frozen=True, slots=True)
class Slot:
    """One model on one node, with everything that does not depend on the request."""

    node: NodeView
    model: ModelView
    unfit: str | None  # why the model cannot be loaded there, or None
    fixed_s: float  # round trip + load time when not loaded
    s_per_prompt: float
    s_per_output: float
    notes: tuple[str, ...]


def fit_reason(node: NodeView, model: ModelView) -> str | None:
    """Why `model` cannot be loaded on `node` (VRAM on a GPU box, RAM on a CPU box)."""
    if model.loaded:
        return None
    free, where = (
        (node.vram_free_bytes, "VRAM") if node.gpu_count > 0 else (node.ram_free_bytes, "RAM")
    )
    if model.memory_bytes <= free:
        return None
    need, have = model.memory_bytes / GIB, free / GIB
    return f"does not fit: needs {need:.1f} GiB, {have:.1f} GiB {where} free"


def make_slot(node: NodeView, model: ModelView) -> Slot:
    load_s = 0.0 if model.loaded else max(model.load_time_s, 0.0)
    notes: tuple[str, ...] = (
        ("loaded",) if model.loaded else (f"not loaded: +{load_s:.1f}s to load",)
    )
    if model.queue_depth > 0:
        notes += (f"queue {model.queue_depth}",)
    return Slot(
        node=node,
        model=model,
        unfit=fit_reason(node, model),
        fixed_s=max(node.rtt_ms, 0.0) / 1000.0 + load_s,
        s_per_prompt=seconds_per_token(model.prefill_tps, FALLBACK_PREFILL_TPS),
        s_per_output=seconds_per_token(model.decode_tps, FALLBACK_DECODE_TPS),
        notes=notes + rate_notes(model.prefill_tps, model.decode_tps),
    )


# --- filters: each returns why it drops the candidate, or None ----------------------


def label_mismatch(labels: Mapping[str, str], req: Request) -> str | None:
    for key, want in req.labels.items():
        have = labels.get(key)
        if have != want:
            return f"label {key}={want} required, has {key}={have or '(none)'}"
    return None


def residency_mismatch(labels: Mapping[str, str], req: Request) -> str | None:
    if req.residency is None or req.residency in (labels.get(k) for k in RESIDENCY_LABELS):
        return None
    where = next((labels[k] for k in RESIDENCY_LABELS if k in labels), "(none)")
    return f"residency {req.residency} required, is at {where}"


def context_overflow(context_length: int | None, req: Request) -> str | None:
    need = req.prompt_tokens + req.max_tokens
    if context_length is None or need <= context_length:
        return None
    return f"context too small: needs {need} tokens, model has {context_length}"


NodeFilter = Callable[[Slot, "Request"], str | None]
CloudFilter = Callable[["CloudView", "Request"], str | None]


def _disconnected(slot: Slot, req: Request) -> str | None:
    return None if slot.node.connected else "node not connected"


def _node_labels(slot: Slot, req: Request) -> str | None:
    return label_mismatch(slot.node.labels, req)


def _node_residency(slot: Slot, req: Request) -> str | None:
    return residency_mismatch(slot.node.labels, req)


def _node_context(slot: Slot, req: Request) -> str | None:
    return context_overflow(slot.model.context_length, req)


def _unfit(slot: Slot, req: Request) -> str | None:
    return slot.unfit


def node_filters(req: Request) -> tuple[NodeFilter, ...]:
    """The node filters that apply to `req`, in the order they are reported."""
    optional = ((req.labels, _node_labels), (req.residency, _node_residency))
    return (_disconnected, *(f for on, f in optional if on), _node_context, _unfit)


def _budget_over(cloud: CloudView, req: Request) -> str | None:
    return "budget exhausted" if req.budget_state == Budget.OVER else None


def _local_residency(cloud: CloudView, req: Request) -> str | None:
    if req.prefer == Prefer.LOCAL and req.residency is not None:
        return "policy local with residency: cloud never used"
    return None


def cloud_filters(req: Request) -> tuple[CloudFilter, ...]:
    return (
        _budget_over,
        _local_residency,
        lambda c, r: label_mismatch(c.labels, r),
        lambda c, r: residency_mismatch(c.labels, r),
        lambda c, r: context_overflow(c.context_length, r),
    )


LOCAL_EDGE_FIRST = "policy local: an edge node can serve"


def first_failure(filters: Sequence[Callable[[T, Request], str | None]], item: T, req: Request,
                  ) -> str | None:
    """The reason of the first filter that drops `item`, or None when all pass."""
    for check in filters:
        reason = check(item, req)
        if reason is not None:
            return reason
    return None

# --- estimates -----------------------------------------------------------------------


def node_estimate(slot: Slot, req: Request) -> float:
    """Queue wait (queued requests taken as this one's size) + load + prefill + decode + rtt."""
    service = req.prompt_tokens * slot.s_per_prompt + req.max_tokens * slot.s_per_output
    return (slot.model.queue_depth + 1) * service + slot.fixed_s


def cloud_estimate(cloud: CloudView, req: Request) -> tuple[float, float]:
    """(seconds, cost): prefill + decode + rtt; list price for the prompt and max tokens."""
    seconds = (
        req.prompt_tokens * seconds_per_token(cloud.prefill_tps, FALLBACK_PREFILL_TPS)
        + req.max_tokens * seconds_per_token(cloud.decode_tps, FALLBACK_DECODE_TPS)
        + max(cloud.rtt_ms, 0.0) / 1000.0
    )
    cost = (
        req.prompt_tokens * cloud.price_prompt_per_1k
        + req.max_tokens * cloud.price_completion_per_1k
    ) / 1000.0
    return seconds, cost


# --- ranking: lower key is better; kind, target and model end every key ---------------

Key = tuple[float | int | str, ...]


def _tail(c: Candidate) -> Key:
    return (KIND_RANK[c.kind], c.target, c.model)


POLICY_KEYS: dict[Prefer, Callable[[Candidate], Key]] = {
    Prefer.SPEED: lambda c: (c.est_seconds, *_tail(c)),
    Prefer.LOCAL: lambda c: (KIND_RANK[c.kind], c.est_seconds, *_tail(c)),
    Prefer.COST: lambda c: (c.est_cost, c.est_seconds, *_tail(c)),
    Prefer.QUALITY: lambda c: (c.preference, c.est_seconds, *_tail(c)),
}


def rank_key(req: Request) -> Callable[[Candidate], Key]:
    """The policy's key; a budget near its end puts every edge candidate first."""
    key = POLICY_KEYS[req.prefer]
    if req.budget_state == Budget.NEAR:
        return lambda c: (KIND_RANK[c.kind], *key(c))
    return key
