"""The fleet as the web pane and `top` show it: one dict per connected node.

Read defensively from what each node last reported (inventory, telemetry):
a field a node did not send is None, never a guess. Everything comes from
the registry in memory; no I/O.
"""

from __future__ import annotations

from typing import Any

from coordinator.live import node_summary
from coordinator.registry import NodeConn, Registry, inventory_models

GPU_FIELDS = ("index", "name", "uuid", "vram_total_bytes", "vram_used_bytes", "gpu_util_pct",
              "mem_util_pct", "temperature_c", "power_draw_w", "power_limit_w",
              "pcie_gen_current", "pcie_gen_max", "pcie_width_current", "pcie_width_max",
              "pcie_tx_kb_s", "pcie_rx_kb_s")


def _plain(value: Any) -> Any:
    """Numbers and strings pass; anything else a node sent becomes None."""
    if isinstance(value, bool):
        return None
    return value if isinstance(value, int | float | str) else None


def gpus_of(telemetry: dict[str, Any]) -> list[dict[str, Any]]:
    raw = telemetry.get("gpus")
    if not isinstance(raw, list):
        return []
    return [{name: _plain(g.get(name)) for name in GPU_FIELDS} for g in raw if isinstance(g, dict)]


def models_of(conn: NodeConn) -> list[dict[str, Any]]:
    """Each model the node offers: loaded or only on disk, its size and context."""
    runtime = conn.telemetry.get("runtime") if isinstance(conn.telemetry, dict) else None
    stats = runtime if isinstance(runtime, dict) else {}
    out = []
    for name, info in sorted(inventory_models(conn.inventory or {}).items()):
        raw = stats.get(name)
        model_stats: dict[str, Any] = raw if isinstance(raw, dict) else {}
        loaded = model_stats.get("loaded", info.get("loaded", True))
        out.append({
            "name": name, "loaded": bool(loaded),
            "size_bytes": _plain(info.get("size_bytes")),
            "context_length": _plain(info.get("context_length")),
            "source": _plain(info.get("source")) or "gguf",
            "in_flight": conn.per_model.get(name, 0),
            "decode_tps": _plain(model_stats.get("decode_tps")),
            "load_time_s": _plain(info.get("load_time_s")),
        })
    return out


def node_view(conn: NodeConn, now: float) -> dict[str, Any]:
    summary = node_summary(conn, now)
    telemetry = conn.telemetry if isinstance(conn.telemetry, dict) else {}
    return {**summary, "did": conn.did, "labels": dict(conn.labels), "suspect": conn.suspect,
            "gpus": gpus_of(telemetry), "model_detail": models_of(conn)}


def fleet(registry: Registry, now: float) -> list[dict[str, Any]]:
    return [node_view(conn, now) for conn in sorted(registry.nodes(), key=lambda c: c.did)]


def models_across(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: the nodes that have it loaded, the ones with it only on disk, in flight."""
    by_model: dict[str, dict[str, Any]] = {}
    for node in nodes:
        for model in node.get("model_detail", []):
            entry = by_model.setdefault(model["name"], {
                "name": model["name"], "loaded_on": [], "on_disk": [], "in_flight": 0,
                "context_length": model.get("context_length"),
                "load_time_s": model.get("load_time_s")})
            (entry["loaded_on"] if model["loaded"] else entry["on_disk"]).append(node["did"])
            entry["in_flight"] += model.get("in_flight") or 0
    return [by_model[k] for k in sorted(by_model)]
