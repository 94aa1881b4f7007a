"""The live registry: which nodes are connected right now, and what they serve.

One entry per connected node, owned by the tunnel server's `on_link` task for
that connection. The registry is only ever changed from the event loop, so it
needs no locks; the dispatcher reads it to build the scheduler's snapshot.
When a node connects again with the same identity the newer connection wins
and the older one is closed (a node that lost its uplink and came back must
not be shadowed by its own ghost).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tunnel import Link, Mux


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
    served: int = 0
    touched_at: float = 0.0

    @property
    def rtt_ms(self) -> float | None:
        return self.link.rtt_ms


class Registry:
    def __init__(self) -> None:
        self._nodes: dict[str, NodeConn] = {}

    def add(self, conn: NodeConn) -> NodeConn | None:
        """Register `conn`; return the older connection of the same node, if any, to close."""
        old = self._nodes.get(conn.did)
        self._nodes[conn.did] = conn
        return old

    def remove(self, conn: NodeConn) -> None:
        if self._nodes.get(conn.did) is conn:
            del self._nodes[conn.did]

    def get(self, did: str) -> NodeConn | None:
        return self._nodes.get(did)

    def nodes(self) -> list[NodeConn]:
        return list(self._nodes.values())

    def serving(self, model: str) -> list[NodeConn]:
        return [n for n in self._nodes.values() if model in n.models]

    def models(self) -> list[str]:
        return sorted({m for n in self._nodes.values() for m in n.models})
