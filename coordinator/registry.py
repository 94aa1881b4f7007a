"""The live registry: which nodes are connected right now, and what they serve.

One entry per connected node (`NodeConn`, coordinator/node_conn.py), owned by the
tunnel server's `on_link` task for that connection. The registry is only ever changed
from the event loop, so it needs no locks. Every change is incremental: a node's
inventory, telemetry or load delta, or a request starting or ending on it, recomputes
that node's scheduler slots and moves them in the per-model index (`FleetIndex`),
which is the view `schedule` reads. Nothing is rebuilt per request or per fleet. When
a node connects again with the same identity the newer connection wins and the older
one is closed (a node that lost its uplink and came back must not be shadowed by its
own ghost).

What a node says arrives typed and validated (`meshgate.node_messages`); the
coordinator still trusts its own observations over the claims: its own count
of requests in flight, and the first-token times and decode rates it measured
(`Observed`). A node that let a request down stays `suspect` until it answers
one in time; its telemetry does not clear the mark.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from coordinator.fleet_index import FleetIndex
from coordinator.held_view import still
from coordinator.node_conn import (
    DEFAULT_CONTEXT,
    UNKNOWN_FREE,
    NodeConn,
    inventory_models,
    model_view,
    node_view,
)
from coordinator.scheduler import CloudView, Snapshot
from meshgate.node_messages import Inventory, LoadDelta, ModelLoad, Telemetry

__all__ = ["DEFAULT_CONTEXT", "UNKNOWN_FREE", "NodeConn", "Registry", "inventory_models",
           "model_view", "node_view"]

class Registry:
    def __init__(self, clouds: Iterable[CloudView] = ()) -> None:
        self._nodes: dict[str, NodeConn] = {}
        self._clouds = tuple(clouds)
        self._index = FleetIndex(self._clouds)
        self._stale: dict[NodeConn, set[str]] = {}
        """nodes whose own in-flight counts moved since their slots were put: `index` puts
        them before anyone reads it (a request acquires and releases: one put, not two)"""
        self.version = 0
        self._snapshot: tuple[tuple[Any, ...], Snapshot] | None = None
        self._waiters: dict[str | None, set[asyncio.Future[None]]] = {}

    # -- waking queued requests

    def _wake(self, models: Iterable[str]) -> None:
        for key in (*models, None):
            waiters = self._waiters.pop(key, None)
            for waiter in waiters or ():
                if not waiter.done():
                    waiter.set_result(None)

    def changed(self, models: Iterable[str] | None = None) -> None:
        """Something the scheduler sees changed for `models` (None: anything): wake the
        requests queued for them."""
        self.version += 1
        self._wake(self._index.models() if models is None else models)

    async def wait_changed(self, within: float | None, models: Iterable[str] = ()) -> None:
        """Wait until capacity may have freed for one of `models` (any change when none
        are named), or `within` seconds; no error either way."""
        waiter = asyncio.get_running_loop().create_future()
        keys: list[str | None] = [*models] or [None]
        for key in keys:
            self._waiters.setdefault(key, set()).add(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), within)
        except TimeoutError:
            pass
        finally:
            for key in keys:
                self._waiters.get(key, set()).discard(waiter)

    # -- changes

    @property
    def index(self) -> FleetIndex:
        """The scheduler's live view, every node's in-flight counts in it."""
        if self._stale:
            stale, self._stale = self._stale, {}
            for conn, models in stale.items():
                if self._nodes.get(conn.did) is not conn:
                    continue
                held = conn.indexed
                if held is not None and still(conn, held, models):
                    # a request came and went (the usual case between two requests): the
                    # counts are back where the index has them, so is the view: nothing put
                    conn.view_cache = held
                    continue
                conn.view_cache = conn.indexed = node_view(conn)
                self._index.put(conn.view_cache, models)
        return self._index

    def _refresh(self, conn: NodeConn, models: Iterable[str] | None = None) -> None:
        """Recompute `conn`'s view and move its slots (all, or only `models`) in the index."""
        conn.view_cache = node_view(conn)
        if self._nodes.get(conn.did) is conn:
            self._index.put(conn.view_cache, models)
            conn.indexed = conn.view_cache
        self.version += 1

    def add(self, conn: NodeConn) -> NodeConn | None:
        """Register `conn`; return the older connection of the same node, if any, to close."""
        old = self._nodes.get(conn.did)
        if old is not None:
            self._index.drop(old.did)
        self._nodes[conn.did] = conn
        self._refresh(conn)
        self._wake(conn.infos)
        return old

    def remove(self, conn: NodeConn) -> None:
        if self._nodes.get(conn.did) is conn:
            del self._nodes[conn.did]
            self._index.drop(conn.did)
            self._stale.pop(conn, None)
            self.version += 1

    def set_inventory(self, conn: NodeConn, inventory: Inventory, raw: dict[str, Any]) -> None:
        conn.infos = inventory.entries()
        conn.models = sorted(conn.infos)
        conn.inventory = raw
        self._refresh(conn)
        self._wake(conn.infos)

    def set_telemetry(
        self, conn: NodeConn, telemetry: Telemetry, raw: dict[str, Any] | bytes
    ) -> None:
        """A full report. Most are the same as the last one for what scheduling reads
        (free memory, GPUs, per-model load): those move nothing in the index."""
        conn.telemetry_raw = raw  # not `telemetry`: see `NodeConn.last_telemetry`
        host = telemetry.host
        free = host.mem_available_bytes if host is not None else None
        if free is None:
            free = UNKNOWN_FREE
        gpus = telemetry.gpus
        count = total = vram_free = 0
        for gpu in gpus:
            count += 1
            total += gpu.vram_total_bytes or 0
            vram_free += gpu.vram_free_bytes or 0
        # free memory moves by bytes every sample: only a 256 MiB step is a change
        same_hw = (free >> 28 == conn.host_free >> 28 and count == conn.gpu_count
                   and total >> 28 == conn.vram_total >> 28
                   and vram_free >> 28 == conn.vram_free >> 28)
        load, released = conn.load, conn.released
        changed: list[str] = []
        for m, new in telemetry.runtime.items():
            old = load.get(m)
            if old == new and m not in released:
                continue
            if m in released or old is None or _scheduled(old) != _scheduled(new):
                changed.append(m)
            else:  # only what the scheduler does not read (the runner's RSS): no slot moves
                load[m] = new
        for name in changed:
            conn.released.pop(name, None)  # the report counts what is in flight now
        if same_hw and not changed:
            return
        conn.host_free, conn.gpu_count, conn.vram_total, conn.vram_free = (
            free, count, total, vram_free)
        freed = [m for m in changed if _frees(conn.load.get(m), telemetry.runtime[m])]
        conn.load.update(telemetry.runtime)
        self._refresh(conn, None if not same_hw else changed)
        if freed:
            self._wake(freed)

    def apply_delta(self, conn: NodeConn, delta: LoadDelta) -> None:
        changed = [m for m in delta.models if m in conn.infos]
        freed = [m for m in changed if _frees(conn.load.get(m), delta.models[m])]
        for name in changed:
            old = conn.load.get(name) or ModelLoad()
            new = delta.models[name]
            conn.load[name] = ModelLoad(**{
                f: getattr(new, f) if getattr(new, f) is not None else getattr(old, f)
                for f in ModelLoad.__struct_fields__})
            if new.in_flight is not None or new.queued is not None or new.queue is not None:
                conn.released.pop(name, None)  # a fresh count
        if changed:
            self._refresh(conn, changed)
        if freed:
            self._wake(freed)

    def set_suspect(self, conn: NodeConn, suspect: bool) -> None:
        if conn.suspect != suspect:
            conn.suspect = suspect
            self._refresh(conn)

    def acquire(self, conn: NodeConn, model: str) -> None:
        conn.in_flight += 1
        conn.per_model[model] = conn.per_model.get(model, 0) + 1
        self._moved(conn, model)

    def release(self, conn: NodeConn, model: str) -> None:
        conn.in_flight -= 1
        left = conn.per_model.get(model, 0) - 1
        if left > 0:
            conn.per_model[model] = left
        else:
            conn.per_model.pop(model, None)
        conn.released[model] = conn.released.get(model, 0) + 1
        self._moved(conn, model)
        self._wake((model,))

    def _moved(self, conn: NodeConn, model: str) -> None:
        """Our in-flight count of `model` on `conn` moved: its view is recomputed when next
        read, and its slot put when `index` is (see there)."""
        conn.view_cache = None
        self._stale.setdefault(conn, set()).add(model)
        self.version += 1

    # -- reads

    def get(self, did: str) -> NodeConn | None:
        return self._nodes.get(did)

    def nodes(self) -> list[NodeConn]:
        return list(self._nodes.values())

    def count(self) -> int:
        """How many nodes are connected."""
        return len(self._nodes)

    def serving(self, model: str) -> list[NodeConn]:
        return [c for did in self._index.dids(model) if (c := self._nodes.get(did)) is not None]

    def models(self) -> list[str]:
        return sorted(self._index.models())

    @property
    def clouds(self) -> tuple[CloudView, ...]:
        return self._clouds

    def snapshot(self) -> Snapshot:
        """A frozen copy of the whole view (tests, the admin pane): O(fleet), rebuilt only
        when something changed. Dispatch reads the live `index` instead."""
        key = (self.version, *(n.link.rtt_ms for n in self._nodes.values()))
        if self._snapshot is None or self._snapshot[0] != key:
            nodes = [node_view(n) for n in self._nodes.values()]
            self._snapshot = (key, Snapshot.build(nodes, self._clouds))
        return self._snapshot[1]


def _scheduled(load: ModelLoad) -> tuple[Any, ...]:
    """What `model_view` and `_frees` read of a model's load (not `rss_bytes`, not
    `load_time_measured`): a report that moves nothing else moves no slot."""
    return (load.loaded, load.in_flight, load.queued, load.queue, load.prefill_tps,
            load.decode_tps, load.load_time_s, load.capacity, load.n_ctx, load.memory_bytes)


def _frees(old: ModelLoad | None, new: ModelLoad) -> bool:
    """Whether `new` may have freed capacity compared with `old` (a queued request may go)."""
    if old is None:
        return True
    return ((new.in_flight or 0) < (old.in_flight or 0) or new.waiting < old.waiting
            or bool(new.loaded) != bool(old.loaded) or new.capacity != old.capacity)
