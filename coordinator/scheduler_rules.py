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
from operator import itemgetter
from typing import TYPE_CHECKING, Any, TypeVar

from coordinator.routing import Prefer

if TYPE_CHECKING:
    from coordinator.scheduler import Candidate, CloudView, ModelView, NodeView, Request

# A rate of zero, negative or not finite means "not measured yet": assume these.
FALLBACK_PREFILL_TPS = 100.0
FALLBACK_DECODE_TPS = 5.0
# The reference request a live index orders each model's slots by (FleetIndex.ordered).
REF_PROMPT = 512
REF_OUTPUT = 256
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
    did: str
    ready: bool  # connected, and loaded or fits: only context and labels left to check
    label_key: tuple[tuple[str, str], ...]  # the node's labels, hashable, for a per-request cache
    unfit: str | None  # why the model cannot be loaded there, or None
    fixed_s: float  # round trip + load time when not loaded
    prompt_s: float  # seconds per prompt token, times the turns to wait (see make_slot)
    output_s: float  # seconds per output token, times the turns to wait
    notes: tuple[str, ...]
    suspect: bool  # let a request down: ranked after every other candidate
    full: bool  # the coordinator's own requests in flight fill the stated capacity
    ref_key: tuple[int, float]  # (tier, estimate for the reference request): live index order


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
    if node.suspect:
        notes += ("suspect: let a request down, not answered one since",)
    unfit = fit_reason(node, model)
    capacity = model.capacity
    # the queue ahead in turns of `capacity` parallel slots (unstated: one), then this request:
    # a free slot is no wait; with all busy, each request ahead of the first free slot is
    # 1/capacity of a turn (staggered); capacity 0 is an upstream we do not cap: no wait
    slots_n = capacity or 1
    ahead = max(model.queue_depth, 0) - slots_n + 1  # requests to finish before a slot frees
    turns = 1.0 if capacity == 0 else 1.0 + max(ahead, 0) / slots_n
    ready = node.connected and unfit is None
    fixed_s = max(node.rtt_ms, 0.0) / 1000.0 + load_s
    prompt_s = turns * seconds_per_token(model.prefill_tps, FALLBACK_PREFILL_TPS)
    output_s = turns * seconds_per_token(model.decode_tps, FALLBACK_DECODE_TPS)
    ref = REF_PROMPT * prompt_s + REF_OUTPUT * output_s + fixed_s
    return Slot(
        node=node,
        model=model,
        did=node.did,
        ready=ready,
        label_key=tuple(sorted(node.labels.items())),
        unfit=unfit,
        fixed_s=fixed_s,
        prompt_s=prompt_s,
        output_s=output_s,
        notes=notes + rate_notes(model.prefill_tps, model.decode_tps),
        suspect=node.suspect,
        full=bool(capacity) and model.in_flight >= (capacity or 0),
        ref_key=(2 if not ready else 1 if node.suspect else 0, ref),
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


def label_filters(req: Request) -> tuple[Callable[[Mapping[str, str], Request], str | None], ...]:
    """The label rules that apply to `req` (none when it asks for no labels or residency)."""
    optional = ((req.labels, label_mismatch), (req.residency, residency_mismatch))
    return tuple(f for on, f in optional if on)


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
    """(queue depth + 1) x (prefill + decode) + load + rtt: queued requests sized like this one."""
    return req.prompt_tokens * slot.prompt_s + req.max_tokens * slot.output_s + slot.fixed_s


def measured(rate: float) -> bool:
    return rate > 0 and math.isfinite(rate)


class SlowestMeasured:
    """The slowest measured prefill and decode (seconds a token) among one model's slots
    in a decision: a slot that has not measured a rate is assumed no faster than that
    (nor than the fallback). A measured rate holds what a request costs on that box
    (on a small prompt, the fixed cost of a first token too); the fallback is a guess,
    and a guess that beats a measurement would send a request to a cold, unmeasured
    node while a loaded one of the same model sits idle."""

    __slots__ = ("output_s", "prompt_s")

    def __init__(self) -> None:
        self.prompt_s = 1.0 / FALLBACK_PREFILL_TPS
        self.output_s = 1.0 / FALLBACK_DECODE_TPS

    def saw(self, model: ModelView) -> bool:
        """Take `model`'s measured rates in; whether a rate of it is unmeasured."""
        prefill, decode = model.prefill_tps, model.decode_tps
        known_p, known_d = measured(prefill), measured(decode)
        if known_p and 1.0 / prefill > self.prompt_s:
            self.prompt_s = 1.0 / prefill
        if known_d and 1.0 / decode > self.output_s:
            self.output_s = 1.0 / decode
        return not (known_p and known_d)

    def estimate(self, slot: Slot, req: Request) -> tuple[float, tuple[str, ...]]:
        """`slot`'s estimate with its unmeasured rates no faster than the slowest measured."""
        model, notes = slot.model, slot.notes
        prompt_s, output_s = slot.prompt_s, slot.output_s
        if not measured(model.prefill_tps) and self.prompt_s * FALLBACK_PREFILL_TPS > 1.0:
            prompt_s *= self.prompt_s * FALLBACK_PREFILL_TPS
            notes += (f"prefill as the slowest measured: {1.0 / self.prompt_s:.3g} tok/s",)
        if not measured(model.decode_tps) and self.output_s * FALLBACK_DECODE_TPS > 1.0:
            output_s *= self.output_s * FALLBACK_DECODE_TPS
            notes += (f"decode as the slowest measured: {1.0 / self.output_s:.3g} tok/s",)
        est = req.prompt_tokens * prompt_s + req.max_tokens * output_s + slot.fixed_s
        return est, notes


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
#
# Survivors are ranked as plain rows, and only the rows returned become Candidates:
#   (est_seconds, est_cost, preference, kind rank (edge 0, cloud 1), target, model, reasons,
#    suspect)
# (target, model, kind) is unique, so no key ever ties: the order is total and deterministic.
# A suspect node (it let a request down and has not answered one since) goes after every
# other candidate, whatever the policy.

Row = tuple[float, float, int, int, str, str, tuple[str, ...], bool]
EST, COST, PREF, KIND, TARGET, MODEL, NOTES, SUSPECT = range(8)
KINDS = (Kind.NODE, Kind.CLOUD)
TAIL = (KIND, TARGET, MODEL)
POLICY_KEYS: dict[Prefer, tuple[int, ...]] = {
    Prefer.EDGE: (SUSPECT, KIND, EST, TARGET, MODEL),  # edge first, clouds kept as the fallback
    Prefer.SPEED: (SUSPECT, EST, *TAIL),  # fastest; edge wins a tie
    Prefer.LOCAL: (SUSPECT, KIND, EST, TARGET, MODEL),  # edge first (cloud only without edge)
    Prefer.COST: (SUSPECT, COST, EST, *TAIL),  # cheapest (edge is free), then fastest
    Prefer.QUALITY: (SUSPECT, PREF, EST, *TAIL),  # earliest candidate model, then fastest
}


def rank_key(req: Request) -> Callable[[Row], tuple[Any, ...]]:
    """The policy's key over rows; a budget near its end puts every edge row first."""
    fields = POLICY_KEYS[req.prefer]
    if req.budget_state == Budget.NEAR and fields[1] != KIND:
        fields = (SUSPECT, KIND, *fields[1:])
    return itemgetter(*fields)


def row(c: Candidate) -> Row:
    """A Candidate back as the row it was ranked as."""
    kind = KINDS.index(c.kind)
    return (c.est_seconds, c.est_cost, c.preference, kind, c.target, c.model, c.reasons,
            c.suspect)
