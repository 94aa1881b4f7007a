"""The live view: which nodes are connected right now, with their latest telemetry.

The registry lives in the server's memory, while the admin commands work on the
state directory with the server running or not. So the server writes a small
``live.json`` next to the store every ``period`` seconds (atomically: write a
temporary file, then rename), and ``meshgate-coordinator nodes`` reads it. A
node is *connected* exactly when it is in a fresh live file; a stale file (the
server stopped or hangs) means nobody is connected. Nothing here is durable
state: losing the file loses nothing.

Per node the summary keeps what an operator scans a fleet for: round trip,
requests in flight, the models loaded and served, CPU load, memory, and per
GPU its name, VRAM used and total, and utilisation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import msgspec

from coordinator.registry import NodeConn, Registry
from meshgate.node_messages import GpuInfo

__all__ = [
    "LIVE_FILE",
    "clear_live",
    "live_view",
    "node_summary",
    "read_live",
    "write_live",
    "write_live_loop",
]

log = logging.getLogger(__name__)

LIVE_FILE = "live.json"
#: A live file older than this many periods is stale: its server is gone or stuck.
STALE_PERIODS = 5
#: The live file is written at most once every DUTY times what writing it took: at most
#: 1% of a core whatever the fleet (1,000 nodes: ~20-40 ms a write in a busy coordinator,
#: so every 2-4 s; every node's telemetry changes each second, so writing only the nodes
#: that changed would write them all).
DUTY = 100


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _gpu(gpu: GpuInfo) -> dict[str, Any]:
    return {
        "name": gpu.name or "?",
        "vram_used_bytes": _float(gpu.vram_used_bytes),
        "vram_total_bytes": _float(gpu.vram_total_bytes),
        "gpu_util_pct": _float(gpu.gpu_util_pct),
    }


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def node_summary(conn: NodeConn, now: float) -> dict[str, Any]:
    """What the live view shows of one connected node (telemetry fields it lacks are None).

    Read from the typed messages the registry keeps (validated once, when they arrived):
    the live view of a fleet is written every few seconds, so this runs per node per
    write (measured ~3x cheaper than decoding each node's last telemetry again)."""
    telemetry = conn.last_telemetry
    host = telemetry.host if telemetry is not None else None
    # what the scheduler sees: the inventory, then telemetry and load deltas on top
    view = conn.view().models
    loaded = sorted(name for name, info in conn.infos.items()
                    if (view[name].loaded if name in view else info.loaded))
    ts = telemetry.ts if telemetry is not None else None
    return {
        "connected_at": conn.connected_at,
        "rtt_ms": conn.rtt_ms,
        "in_flight": conn.in_flight,
        "served": conn.served,
        "models": sorted(conn.models),
        "loaded": loaded,
        "cpu_count": None if host is None else _float(host.cpu_count),
        "cpu_util_pct": None if host is None else _float(host.cpu_util_pct),
        "load_1m": float(host.load_avg[0]) if host is not None and host.load_avg else None,
        "mem_total_bytes": None if host is None else _float(host.mem_total_bytes),
        "mem_available_bytes": None if host is None else _float(host.mem_available_bytes),
        "gpus": [_gpu(g) for g in telemetry.gpus] if telemetry is not None else [],
        "telemetry_age_s": None if ts is None else max(0.0, now - ts),
    }


def live_view(registry: Registry, now: float) -> dict[str, Any]:
    return {
        "written_at": now,
        "pid": os.getpid(),
        "nodes": {conn.did: node_summary(conn, now) for conn in registry.nodes()},
    }


def write_live(path: Path, registry: Registry, period: float, now: float | None = None) -> None:
    view = live_view(registry, time.time() if now is None else now)
    view["period_s"] = period
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.encode(view))  # JSON, ~4x faster than json.dumps here
    tmp.replace(path)


def paced(period: float, took: float, before: float) -> float:
    """The next period of a writer whose last write took `took` seconds: `period`, or long
    enough that writing costs at most 1/DUTY of a core (a fleet of 10,000 nodes is a big
    file), growing at most STALE_PERIODS - 1 times the `before` period at a step so a
    reader never finds the file stale in between."""
    return max(period, min(took * DUTY, before * (STALE_PERIODS - 1)))


async def write_live_loop(path: Path, registry: Registry, period: float = 2.0) -> None:
    """Write the live view every `period` seconds (longer for a fleet so large that writing
    it that often would cost more than 1/DUTY of a core), and once more (empty) when
    cancelled."""
    now_period = period
    try:
        while True:
            began = time.perf_counter()
            try:
                write_live(path, registry, now_period)
            except OSError as exc:  # a full disk must not take the coordinator down
                log.warning("cannot write the live view %s: %s", path, exc)
            now_period = paced(period, time.perf_counter() - began, now_period)
            await asyncio.sleep(now_period)
    finally:
        clear_live(path)  # stopped: nobody is connected


def clear_live(path: Path) -> None:
    path.unlink(missing_ok=True)


def read_live(path: Path, now: float) -> dict[str, dict[str, Any]] | None:
    """did -> summary from a fresh live file; None when no server is writing one."""
    try:
        view = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(view, dict) or not isinstance(view.get("nodes"), dict):
        return None
    written = _number(view.get("written_at"))
    period = _number(view.get("period_s")) or 2.0
    if written is None or now - written > STALE_PERIODS * period:
        return None
    nodes: dict[str, dict[str, Any]] = view["nodes"]
    return nodes
