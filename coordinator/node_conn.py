"""One connected node as the coordinator holds it (`NodeConn`) and the scheduler's view
of it (`node_view`, `model_view`), made from the node's claims (its inventory and
telemetry, typed in `meshgate.node_messages`) and the coordinator's own observations
(its count of requests in flight, the first-token times and decode rates it measured:
`Observed`). The registry (coordinator/registry.py) owns these and moves their slots in
the scheduler's index.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.held_view import NO_LOAD, moving
from coordinator.observed import Observed
from coordinator.scheduler import ModelView, NodeView
from meshgate.node_messages import ModelInfo, ModelLoad, Telemetry, as_received, parse_telemetry
from tunnel import Link, Mux

DEFAULT_CONTEXT = 4096
UNKNOWN_FREE = 1 << 62


@dataclass(eq=False)
class NodeConn:
    did: str
    labels: dict[str, str]
    link: Link
    mux: Mux
    connected_at: float = field(default_factory=time.time)
    models: list[str] = field(default_factory=list)
    inventory: dict[str, Any] = field(default_factory=dict)  # as received (validated)
    #: the last telemetry as received (validated): its map, or its msgpack bytes from the
    #: tunnel (`Mux(raw_bodies=...)`), decoded into `telemetry` or `last_telemetry` only
    #: when read
    telemetry_raw: dict[str, Any] | bytes = field(default_factory=dict)
    infos: dict[str, ModelInfo] = field(default_factory=dict)
    load: dict[str, ModelLoad] = field(default_factory=dict)  # latest per model
    host_free: int = UNKNOWN_FREE
    gpu_count: int = 0
    vram_total: int = 0
    vram_free: int = 0
    in_flight: int = 0
    per_model: dict[str, int] = field(default_factory=dict)
    #: our requests per model that ended since the node last reported that model: its
    #: reported count still holds them until its next report (<= 100 ms for a delta)
    released: dict[str, int] = field(default_factory=dict)
    observed: dict[str, Observed] = field(default_factory=dict)
    served: int = 0
    touched_at: float = 0.0
    suspect: bool = False
    """It let a request down (no first token in time, a stalled stream): tried after every
    other candidate until it answers a request in time."""
    results: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    loading: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    view_cache: NodeView | None = None
    #: the view whose slots the index holds (`Registry.index` puts none while it still holds)
    indexed: NodeView | None = None

    @property
    def rtt_ms(self) -> float | None:
        return self.link.rtt_ms

    @property
    def telemetry(self) -> dict[str, Any]:
        """The last telemetry map as the node sent it (decoded on the first read after it
        arrived: the live view reads it every few seconds, telemetry comes every second)."""
        raw = self.telemetry_raw
        if isinstance(raw, bytes):
            raw = self.telemetry_raw = as_received(raw)
        return raw

    @property
    def last_telemetry(self) -> Telemetry | None:
        """The last full report, typed (the live view's read, every few seconds), decoded
        again from what was received: the registry keeps a report as its bytes only, so
        that replacing it each second frees one object, not a typed report's ~20 (freeing
        a report received a second ago, out of the CPU's caches by then, was ~7% of a
        1,000-node coordinator's telemetry CPU in a native profile, ~6 us a frame)."""
        raw = self.telemetry_raw
        if not raw:
            return None
        report = parse_telemetry(raw)
        return report if isinstance(report, Telemetry) else None

    def view(self) -> NodeView:
        if self.view_cache is None:
            self.view_cache = node_view(self)
        return self.view_cache

    def loaded(self, model: str) -> bool:
        """Whether the node reports `model` loaded (unknown counts as loaded)."""
        view = self.view().models.get(model)
        return view is None or view.loaded

    def seen(self, model: str) -> Observed:
        got = self.observed.get(model)
        if got is None:
            got = self.observed[model] = Observed()
        return got

    def on_result(self, body: dict[str, Any]) -> None:
        """A RESULT frame: complete the COMMAND waiting for it."""
        waiter = self.results.pop(str(body.get("id")), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(body)

    def fail_pending(self, reason: str) -> None:
        waiters: list[asyncio.Future[Any]] = [*self.results.values(), *self.loading.values()]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionError(reason))
                waiter.exception()  # retrieved: nobody may be waiting any more
        self.results.clear()
        self.loading.clear()


def inventory_models(body: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> details from an INVENTORY body as received (for display)."""
    out: dict[str, dict[str, Any]] = {}
    models = body.get("models")
    if not isinstance(models, list):
        return out
    for entry in models:
        if isinstance(entry, str) and entry:
            out.setdefault(entry, {})
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry["name"]:
            out.setdefault(entry["name"], dict(entry))
    return out


def model_view(conn: NodeConn, name: str, info: ModelInfo) -> ModelView:
    """One model on one node: the node's claims, our own in-flight count and measurements."""
    load = conn.load.get(name) or NO_LOAD
    ours, queue_depth, decode = moving(conn, name, load)
    loaded = load.loaded if load.loaded is not None else info.loaded
    prefill = load.prefill_tps or 0.0
    capacity = load.capacity if load.capacity is not None else info.capacity
    return ModelView(
        name=name,
        loaded=loaded,
        context_length=load.n_ctx or info.ctx or DEFAULT_CONTEXT,
        memory_bytes=load.memory_bytes or info.memory_bytes or info.size_bytes or 0,
        prefill_tps=prefill,
        decode_tps=decode,
        queue_depth=queue_depth,
        in_flight=ours,
        load_time_s=(load.load_time_s if load.load_time_s is not None
                     else info.load_time_s or 0.0),
        capacity=capacity,
    )


def node_view(conn: NodeConn) -> NodeView:
    """The scheduler's view of one connected node."""
    return NodeView(
        did=conn.did,
        models={name: model_view(conn, name, info) for name, info in conn.infos.items()},
        labels=conn.labels,
        connected=not conn.link.closed,
        rtt_ms=conn.rtt_ms or 0.0,
        gpu_count=conn.gpu_count,
        vram_total_bytes=conn.vram_total,
        vram_free_bytes=conn.vram_free,
        ram_free_bytes=conn.host_free,
        suspect=conn.suspect,
    )
