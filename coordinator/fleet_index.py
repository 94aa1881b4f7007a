"""The scheduler's live view of the fleet, kept current one node at a time.

`FleetIndex` holds, per model, every node's `Slot` (the request-independent
figures the scheduler needs) and an order of those slots by their estimate
for a reference request (`REF_PROMPT` prompt tokens, `REF_OUTPUT` output
tokens). The registry calls `put` when a node's inventory, telemetry or load
changed (only that node's slots move: O(models x log fleet)) and `drop` when
it leaves. `schedule` reads it through the same interface as a frozen
`Snapshot`: `slots_for`, `ordered`, `clouds_for`; with a `limit` it walks
`ordered` and looks at the best few slots only, so a decision costs the same
with 10 nodes or 10,000.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sortedcontainers import SortedList

from coordinator import scheduler_rules as rules
from coordinator.scheduler import CloudView, NodeView
from coordinator.scheduler_rules import Slot


class FleetIndex:
    def __init__(self, clouds: Iterable[CloudView] = ()) -> None:
        self._slots: dict[str, dict[str, Slot]] = {}  # model -> did -> slot
        # model -> (key, did) in order; (model, did) -> its key there
        self._order: dict[str, SortedList[tuple[tuple[int, float], str]]] = {}
        self._keys: dict[tuple[str, str], tuple[int, float]] = {}
        self._by_node: dict[str, tuple[str, ...]] = {}  # did -> models indexed for it
        cloud_map: dict[str, list[CloudView]] = {}
        for cloud in sorted(clouds, key=lambda c: c.name):
            for name in sorted(cloud.models):
                cloud_map.setdefault(name, []).append(cloud)
        self._clouds = {k: tuple(v) for k, v in cloud_map.items()}

    # -- updates

    def put(self, node: NodeView, models: Iterable[str] | None = None) -> None:
        """`node` as it is now; only `models` changed (None: any of them, or the set)."""
        did = node.did
        if models is None:
            for gone in set(self._by_node.get(did, ())) - set(node.models):
                self._remove(gone, did)
            self._by_node[did] = tuple(node.models)
            models = node.models
        for name in models:
            model = node.models.get(name)
            if model is not None:
                self._set(name, rules.make_slot(node, model))

    def drop(self, did: str) -> None:
        for name in self._by_node.pop(did, ()):
            self._remove(name, did)

    def _set(self, model: str, slot: Slot) -> None:
        key = slot.ref_key
        old = self._keys.get((model, slot.did))
        order = self._order.get(model)
        if order is None:
            order = self._order[model] = SortedList()
            self._slots[model] = {}
        if old != key:
            if old is not None:
                order.remove((old, slot.did))
            order.add((key, slot.did))
            self._keys[(model, slot.did)] = key
        self._slots[model][slot.did] = slot

    def _remove(self, model: str, did: str) -> None:
        key = self._keys.pop((model, did), None)
        if key is None:
            return
        self._order[model].remove((key, did))
        del self._slots[model][did]
        if not self._slots[model]:
            del self._slots[model], self._order[model]

    # -- reads (the scheduler's view)

    def slots_for(self, model: str) -> Iterable[Slot]:
        return self._slots.get(model, {}).values()

    def ordered(self, model: str) -> Iterator[Slot]:
        slots = self._slots.get(model)
        if slots is None:
            return iter(())
        return (slots[did] for _, did in self._order[model])

    def count(self, model: str) -> int:
        return len(self._slots.get(model, ()))

    def clouds_for(self, model: str) -> tuple[CloudView, ...]:
        return self._clouds.get(model, ())

    def models(self) -> Iterable[str]:
        return self._slots.keys()

    def dids(self, model: str) -> Iterable[str]:
        return self._slots.get(model, {}).keys()

    def slot(self, model: str, did: str) -> Slot | None:
        return self._slots.get(model, {}).get(did)
