"""The live registry: which nodes are connected right now, and what they serve.

One entry per connected node, owned by the tunnel server's `on_link` task for
that connection. The registry is only ever changed from the event loop, so it
needs no locks; the dispatcher reads it through `snapshot()`, the scheduler's
view of the fleet, rebuilt only after something changed (a node came or went,
sent inventory or telemetry, or a request started or ended on it).
When a node connects again with the same identity the newer connection wins
and the older one is closed (a node that lost its uplink and came back must
not be shadowed by its own ghost).

What a node reports is read defensively: an inventory's `models` is a list of
names or of maps (`name`, `loaded`, `context_length`, `memory_bytes`, ...);
telemetry carries `host` (psutil), `gpus` (NVML) and `runtime` (per model:
`in_flight`, `queue`, `prefill_tps`, `decode_tps`, `loaded`). A field that is
missing or of the wrong type is "not known", never an error.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.scheduler import CloudView, ModelView, NodeView, Snapshot
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
    inventory: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] = field(default_factory=dict)
    in_flight: int = 0
    per_model: dict[str, int] = field(default_factory=dict)
    served: int = 0
    touched_at: float = 0.0
    suspect: bool = False
    """It let a request down by going silent (no first token, a stalled stream) and has
    sent nothing since: tried after every other node until it is heard from again."""
    results: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    loading: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    @property
    def rtt_ms(self) -> float | None:
        return self.link.rtt_ms

    def view(self) -> NodeView:
        return node_view(self)

    def loaded(self, model: str) -> bool:
        """Whether the node reports `model` loaded (unknown counts as loaded)."""
        view = node_view(self).models.get(model)
        return view is None or view.loaded

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


def _num(value: Any, default: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value) if math.isfinite(value) else default


def _int(value: Any, default: int = 0) -> int:
    return int(_num(value, default))


def inventory_models(body: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> details from an INVENTORY body (names alone, or maps with a `name`)."""
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


def node_view(conn: NodeConn) -> NodeView:
    """The scheduler's view of one connected node."""
    telemetry = conn.telemetry
    runtime = telemetry.get("runtime")
    runtime = runtime if isinstance(runtime, dict) else {}
    gpus = [g for g in telemetry.get("gpus") or [] if isinstance(g, dict)]
    host = telemetry.get("host") if isinstance(telemetry.get("host"), dict) else None
    models: dict[str, ModelView] = {}
    for name, info in inventory_models(conn.inventory).items():
        entry = runtime.get(name)
        stats: dict[str, Any] = entry if isinstance(entry, dict) else {}
        loaded = stats.get("loaded", info.get("loaded", True))
        ours = conn.per_model.get(name, 0)
        reported = _int(stats.get("in_flight")) + _int(stats.get("queue"))
        models[name] = ModelView(
            name=name,
            loaded=bool(loaded),
            context_length=_int(info.get("context_length"), DEFAULT_CONTEXT) or DEFAULT_CONTEXT,
            memory_bytes=_int(info.get("memory_bytes") or info.get("size_bytes")),
            prefill_tps=_num(stats.get("prefill_tps")),
            decode_tps=_num(stats.get("decode_tps")),
            queue_depth=max(ours, reported),
            in_flight=ours,
            load_time_s=_num(info.get("load_time_s")),
        )
    return NodeView(
        did=conn.did,
        models=models,
        labels=dict(conn.labels),
        connected=not conn.link.closed,
        rtt_ms=conn.rtt_ms or 0.0,
        gpu_count=len(gpus),
        vram_total_bytes=sum(_int(g.get("vram_total_bytes")) for g in gpus),
        vram_free_bytes=sum(_int(g.get("vram_free_bytes")) for g in gpus),
        # no host figures yet: memory unknown, so a model is not filtered for want of it
        ram_free_bytes=(_int(host.get("mem_available_bytes")) if isinstance(host, dict)
                        else UNKNOWN_FREE),
    )


class Registry:
    def __init__(self, clouds: Iterable[CloudView] = ()) -> None:
        self._nodes: dict[str, NodeConn] = {}
        self._clouds = tuple(clouds)
        self.version = 0
        self._snapshot: tuple[tuple[Any, ...], Snapshot] | None = None
        self._waiters: set[asyncio.Future[None]] = set()

    # -- changes

    def changed(self) -> None:
        """Something the scheduler sees changed: drop the snapshot, wake queued requests."""
        self.version += 1
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait_changed(self, within: float | None) -> None:
        """Wait until the next change (or `within` seconds; no error either way)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), within)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)

    def add(self, conn: NodeConn) -> NodeConn | None:
        """Register `conn`; return the older connection of the same node, if any, to close."""
        old = self._nodes.get(conn.did)
        self._nodes[conn.did] = conn
        self.changed()
        return old

    def remove(self, conn: NodeConn) -> None:
        if self._nodes.get(conn.did) is conn:
            del self._nodes[conn.did]
            self.changed()

    def acquire(self, conn: NodeConn, model: str) -> None:
        conn.in_flight += 1
        conn.per_model[model] = conn.per_model.get(model, 0) + 1
        self.changed()

    def release(self, conn: NodeConn, model: str) -> None:
        conn.in_flight -= 1
        left = conn.per_model.get(model, 0) - 1
        if left > 0:
            conn.per_model[model] = left
        else:
            conn.per_model.pop(model, None)
        self.changed()

    # -- reads

    def get(self, did: str) -> NodeConn | None:
        return self._nodes.get(did)

    def nodes(self) -> list[NodeConn]:
        return list(self._nodes.values())

    def serving(self, model: str) -> list[NodeConn]:
        return [n for n in self._nodes.values() if model in n.models]

    def models(self) -> list[str]:
        return sorted({m for n in self._nodes.values() for m in n.models})

    @property
    def clouds(self) -> tuple[CloudView, ...]:
        return self._clouds

    def snapshot(self) -> Snapshot:
        """The scheduler's view; rebuilt only when something changed since the last call
        (a change, or a new round-trip time measured by a tunnel ping)."""
        key = (self.version, *(n.link.rtt_ms for n in self._nodes.values()))
        if self._snapshot is None or self._snapshot[0] != key:
            nodes = [node_view(n) for n in self._nodes.values()]
            self._snapshot = (key, Snapshot.build(nodes, self._clouds))
        return self._snapshot[1]
