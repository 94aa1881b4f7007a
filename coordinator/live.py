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

from coordinator.registry import NodeConn, Registry, inventory_models

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
#: The live file is written at most once every DUTY times what writing it took.
DUTY = 50


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _gpu(gpu: Any) -> dict[str, Any] | None:
    if not isinstance(gpu, dict):
        return None
    return {
        "name": str(gpu.get("name") or "?"),
        "vram_used_bytes": _number(gpu.get("vram_used_bytes")),
        "vram_total_bytes": _number(gpu.get("vram_total_bytes")),
        "gpu_util_pct": _number(gpu.get("gpu_util_pct")),
    }


def node_summary(conn: NodeConn, now: float) -> dict[str, Any]:
    """What the live view shows of one connected node (telemetry fields it lacks are None)."""
    telemetry = conn.telemetry if isinstance(conn.telemetry, dict) else {}
    raw_host, raw_gpus = telemetry.get("host"), telemetry.get("gpus")
    host: dict[str, Any] = raw_host if isinstance(raw_host, dict) else {}
    gpus: list[Any] = raw_gpus if isinstance(raw_gpus, list) else []
    load = host.get("load_avg")
    models = inventory_models(conn.inventory) if conn.inventory else {}
    # what the scheduler sees: the inventory, then telemetry and load deltas on top
    view = conn.view().models
    loaded = sorted(name for name, info in models.items()
                    if (view[name].loaded if name in view else info.get("loaded", True)))
    ts = _number(telemetry.get("ts"))
    return {
        "connected_at": conn.connected_at,
        "rtt_ms": conn.rtt_ms,
        "in_flight": conn.in_flight,
        "served": conn.served,
        "models": sorted(conn.models),
        "loaded": loaded,
        "cpu_count": _number(host.get("cpu_count")),
        "cpu_util_pct": _number(host.get("cpu_util_pct")),
        "load_1m": _number(load[0]) if isinstance(load, list) and load else None,
        "mem_total_bytes": _number(host.get("mem_total_bytes")),
        "mem_available_bytes": _number(host.get("mem_available_bytes")),
        "gpus": [g for g in (_gpu(x) for x in gpus) if g is not None],
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
    tmp.write_text(json.dumps(view, separators=(",", ":")))
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
