"""Where should this request run? A pure function over a snapshot of the fleet.

    schedule(request, snapshot) -> Decision(candidates best first, rejected with why)

Every (node, model) and (cloud, model) pair that could serve one of the
request's candidate models goes through the filters (`scheduler_rules.py`);
the first filter that fails names the reason it is rejected. Survivors get an
estimated time to finish (queue wait + load when not loaded + prefill +
decode + round trip) and a cost (0 on the edge), and the request's policy
orders them. No I/O, no clock, no logging, no randomness: the same snapshot
and request give the same decision, ties broken by kind (edge first), target
id and model name. The rules in words are in `SCHEDULER.md`.

The view is anything with `slots_for`, `ordered`, `count` and `clouds_for`
(`View`): a frozen `Snapshot` (tests, the simulation) or the registry's live
`FleetIndex`, kept current node by node. Without `limit` every slot of the
requested models is ranked; with `limit`, `ordered` (slots by their estimate
for a reference request, ready and unsuspected first) is walked until
`WINDOW` (at least 4 x `limit`) slots survived the filters, and only those are
ranked exactly: a decision then costs the same at any fleet size.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from coordinator import scheduler_rules as rules
from coordinator.routing import Prefer
from coordinator.scheduler_rules import Budget, Kind, Slot

__all__ = [
    "Budget",
    "Candidate",
    "CloudView",
    "Decision",
    "Kind",
    "ModelView",
    "NodeView",
    "Prefer",
    "Rejection",
    "Request",
    "Snapshot",
    "View",
    "schedule",
]

WINDOW = 32  # slots ranked exactly per model when a `limit` is given (at least 4 x limit)
MAX_WALK = 8  # with a limit, at most this many windows of slots are looked at per model


@dataclass(frozen=True, slots=True)
class ModelView:
    name: str
    loaded: bool = False
    context_length: int = 4096
    memory_bytes: int = 0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    queue_depth: int = 0
    in_flight: int = 0  # the coordinator's own requests on it
    load_time_s: float = 0.0
    capacity: int | None = None  # parallel slots; 0: not capped by us; None: not stated (1)


@dataclass(frozen=True, slots=True)
class NodeView:
    did: str
    models: Mapping[str, ModelView] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    connected: bool = True
    rtt_ms: float = 0.0
    gpu_count: int = 0
    vram_total_bytes: int = 0
    vram_free_bytes: int = 0
    ram_free_bytes: int = 0
    suspect: bool = False  # let a request down and has not answered one since


@dataclass(frozen=True, slots=True)
class CloudView:
    name: str
    models: frozenset[str]
    price_prompt_per_1k: float = 0.0
    price_completion_per_1k: float = 0.0
    rtt_ms: float = 0.0
    decode_tps: float = 0.0
    prefill_tps: float = 0.0
    context_length: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Snapshot:
    nodes: tuple[NodeView, ...] = ()
    clouds: tuple[CloudView, ...] = ()
    _slots: Mapping[str, tuple[Slot, ...]] = field(init=False, repr=False, compare=False)
    _clouds: Mapping[str, tuple[CloudView, ...]] = field(init=False, repr=False, compare=False)
    _ordered: Mapping[str, tuple[Slot, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for kind, names in (("did", [n.did for n in self.nodes]),
                            ("cloud", [c.name for c in self.clouds])):
            dupes = sorted(k for k, n in Counter(names).items() if n > 1)
            if dupes:
                raise ValueError(f"snapshot: duplicate {kind} {dupes[0]!r}")
        slots: dict[str, list[Slot]] = {}
        for node in sorted(self.nodes, key=lambda n: n.did):
            for name, model in node.models.items():
                slots.setdefault(name, []).append(rules.make_slot(node, model))
        clouds: dict[str, list[CloudView]] = {}
        for cloud in sorted(self.clouds, key=lambda c: c.name):
            for name in sorted(cloud.models):
                clouds.setdefault(name, []).append(cloud)
        object.__setattr__(self, "_slots", {k: tuple(v) for k, v in slots.items()})
        object.__setattr__(self, "_ordered", {
            k: tuple(sorted(v, key=lambda s: (s.ref_key, s.did))) for k, v in slots.items()})
        object.__setattr__(self, "_clouds", {k: tuple(v) for k, v in clouds.items()})

    @classmethod
    def build(cls, nodes: Iterable[NodeView], clouds: Iterable[CloudView] = ()) -> Snapshot:
        return cls(tuple(nodes), tuple(clouds))

    def slots_for(self, model: str) -> tuple[Slot, ...]:
        return self._slots.get(model, ())

    def ordered(self, model: str) -> Iterator[Slot]:
        return iter(self._ordered.get(model, ()))

    def count(self, model: str) -> int:
        return len(self._slots.get(model, ()))

    def clouds_for(self, model: str) -> tuple[CloudView, ...]:
        return self._clouds.get(model, ())


class View(Protocol):
    """What `schedule` reads: a `Snapshot`, or the registry's live `FleetIndex`."""

    def slots_for(self, model: str) -> Iterable[Slot]: ...
    def ordered(self, model: str) -> Iterator[Slot]: ...
    def count(self, model: str) -> int: ...
    def clouds_for(self, model: str) -> tuple[CloudView, ...]: ...


@dataclass(frozen=True, slots=True)
class Request:
    models: Sequence[str]  # candidate model names, most preferred first
    prompt_tokens: int
    max_tokens: int
    prefer: Prefer = Prefer.EDGE
    residency: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)  # required node labels
    budget_state: Budget = Budget.OK

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0 or self.max_tokens < 0:
            raise ValueError("request: token counts must not be negative")
        models = self.models
        if type(models) is not tuple or len(models) > 1:  # (one name: no repeats to drop)
            object.__setattr__(self, "models", tuple(dict.fromkeys(models)))
        if type(self.prefer) is not Prefer:  # (an enum's call costs ~0.5 us: only when needed)
            object.__setattr__(self, "prefer", Prefer(self.prefer))  # "cost" -> Prefer.COST
        if type(self.budget_state) is not Budget:
            object.__setattr__(self, "budget_state", Budget(self.budget_state))


class Candidate(NamedTuple):
    kind: Kind
    target: str  # node did or cloud name
    model: str
    est_seconds: float
    est_cost: float
    preference: int  # index of `model` in the request's candidate models
    reasons: tuple[str, ...] = ()
    suspect: bool = False


class Rejection(NamedTuple):
    kind: Kind | None  # None: no node or cloud has the model at all
    target: str
    model: str
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    candidates: list[Candidate]
    rejected: list[Rejection]
    omitted: int = 0  # survivors left out by `limit`

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def explain(self) -> str:
        """Why candidates were dropped, most common reason first (for a 503 message)."""
        counts = Counter(r.reason for r in self.rejected)
        return "; ".join(f"{n} x {reason}" for reason, n in counts.most_common())


class _LabelCheck:
    """The label and residency rules for one request, cached per distinct label set."""

    def __init__(self, req: Request) -> None:
        self._req = req
        self._filters = rules.label_filters(req)
        self._seen: dict[tuple[tuple[str, str], ...], str | None] = {}

    def __bool__(self) -> bool:
        return bool(self._filters)

    def reason(self, slot: Slot) -> str | None:
        if slot.label_key not in self._seen:
            labels = slot.node.labels
            self._seen[slot.label_key] = next(
                (r for f in self._filters if (r := f(labels, self._req)) is not None), None)
        return self._seen[slot.label_key]


def _edge(req: Request, snap: View, rejected: list[Rejection],
          window: int | None, keep: int = 0) -> tuple[list[rules.Row], int]:
    """Node rows, and how many slots were not looked at. With a `window`, each model's
    slots are walked in the view's reference order until `window` survived *and* no slot
    further down can beat the `keep` best estimates found (`_beyond`), or MAX_WALK x
    `window` slots were looked at. Hot path: a ready slot whose context fits needs only
    the label check; every other slot goes through the filters in order, which name the
    first failure."""
    filters, labels = rules.node_filters(req), _LabelCheck(req) or None
    need = req.prompt_tokens + req.max_tokens
    scale = _scale(req)
    out: list[rules.Row] = []
    unseen = 0
    for pref, model in enumerate(req.models):
        slots: Iterable[Slot] = snap.slots_for(model) if window is None else snap.ordered(model)
        seen = survived = 0
        best: list[float] = []  # max-heap (negated) of the `keep` best estimates, tier 0
        # slots with an unmeasured rate: estimated again once the slowest measured is known.
        # The walk's bound (`_beyond`) saw their first, lower estimate: with many unmeasured
        # slots it may stop before a slot that would have beaten their final one (best effort;
        # the window still holds `window` survivors)
        slowest, guessed = rules.SlowestMeasured(), []
        for slot in slots:
            if window is not None and survived >= window and (
                    seen >= MAX_WALK * window or _beyond(slot, best, keep, scale)):
                break
            seen += 1
            if slot.ready and need <= slot.model.context_length:
                reason = labels.reason(slot) if labels else None
            else:
                reason = rules.first_failure(filters, slot, req)
            if reason is None:
                survived += 1
                est = rules.node_estimate(slot, req)
                if slowest.saw(slot.model):
                    guessed.append((len(out), slot))
                out.append((est, 0.0, pref, 0, slot.did, model, slot.notes, slot.suspect))
                if keep and not slot.suspect:
                    _keep_best(best, keep, est)
            else:
                rejected.append(Rejection._make((Kind.NODE, slot.did, model, reason)))
        for i, slot in guessed:
            est, notes = slowest.estimate(slot, req)
            out[i] = (est, 0.0, pref, 0, slot.did, model, notes, slot.suspect)
        if window is not None:
            unseen += snap.count(model) - seen
    return out, unseen


def _keep_best(best: list[float], keep: int, est: float) -> None:
    """`best` (a max-heap of negated estimates) keeps the `keep` lowest seen."""
    if len(best) < keep:
        heapq.heappush(best, -est)
    elif est < -best[0]:
        heapq.heapreplace(best, -est)


def _scale(req: Request) -> float:
    """A lower bound of (this request's estimate) / (the reference estimate) on any slot:
    both are sums of the same per-slot terms (prompt, output, fixed) with weights
    (P, O, 1) and (REF_PROMPT, REF_OUTPUT, 1)."""
    return min(1.0, req.prompt_tokens / rules.REF_PROMPT, req.max_tokens / rules.REF_OUTPUT)


def _beyond(slot: Slot, best: list[float], keep: int, scale: float) -> bool:
    """Whether `slot` and every slot after it in the reference order can be left out:
    past the ready, unsuspected tier (they rank after it, or cannot serve), or
    `scale` x its reference estimate is no better than the `keep`-th best found."""
    tier, ref = slot.ref_key
    if tier > 0 or scale <= 0.0:  # (no output tokens: no bound; the window alone, as before)
        return True
    return len(best) >= keep and scale * ref > -best[0]


def _cloud(req: Request, snap: View, rejected: list[Rejection], edge: bool) -> list[rules.Row]:
    filters = rules.cloud_filters(req)
    notes = ("budget near: after every edge node",) if req.budget_state == Budget.NEAR else ()
    out: list[rules.Row] = []
    for pref, model in enumerate(req.models):
        for cloud in snap.clouds_for(model):
            reason = rules.first_failure(filters, cloud, req)
            if reason is None and edge and req.prefer == Prefer.LOCAL:
                reason = rules.LOCAL_EDGE_FIRST
            if reason is not None:
                rejected.append(Rejection(Kind.CLOUD, cloud.name, model, reason))
                continue
            seconds, cost = rules.cloud_estimate(cloud, req)
            out.append((seconds, cost, pref, 1, cloud.name, model, notes, False))
    return out


def _candidate(row: rules.Row) -> Candidate:
    est, cost, pref, kind, target, model, notes, suspect = row
    return Candidate._make((rules.KINDS[kind], target, model, est, cost, pref, notes, suspect))


def schedule(request: Request, snapshot: View, *, limit: int | None = None) -> Decision:
    """Rank the nodes and clouds that can serve `request`; say why the others cannot.

    With `limit`, only the best `limit` candidates are returned, chosen among the
    best `WINDOW` node slots per model by the view's order, and `omitted` counts
    what was left out (candidates not returned and slots not looked at).
    """
    rejected: list[Rejection] = [
        Rejection(None, "", m, f"no node or cloud has model {m!r}")
        for m in request.models
        if not snapshot.count(m) and not snapshot.clouds_for(m)
    ]
    window = None if limit is None else max(WINDOW, 4 * limit)
    edge, unseen = _edge(request, snapshot, rejected, window, max(limit or 0, 1))
    rows = edge + _cloud(request, snapshot, rejected, bool(edge) or unseen > 0)
    key = rules.rank_key(request)
    if limit is None or limit >= len(rows):
        return Decision(list(map(_candidate, sorted(rows, key=key))), rejected, omitted=unseen)
    best = heapq.nsmallest(max(limit, 0), rows, key=key)
    return Decision(list(map(_candidate, best)), rejected,
                    omitted=len(rows) - len(best) + unseen)
