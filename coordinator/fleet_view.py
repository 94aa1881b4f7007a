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


def short_did(did: Any) -> str:
    """`did:key:z6Mk…` names are long: the method-specific tail tells nodes apart."""
    text = str(did or "?")
    if text.startswith("cloud:"):
        return text
    tail = text.rsplit(":", 1)[-1]
    return f"{tail[:4]}…{tail[-6:]}" if len(tail) > 12 else tail


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
    """Each model the node offers: loaded or only on disk, its size, context, queue, rates.

    The registry's typed view (`infos`, and `load` kept current by the node's deltas) wins
    over the raw inventory and telemetry, which older nodes alone send."""
    runtime = conn.telemetry.get("runtime") if isinstance(conn.telemetry, dict) else None
    stats = runtime if isinstance(runtime, dict) else {}
    infos = getattr(conn, "infos", {}) or {}
    loads = getattr(conn, "load", {}) or {}
    out = []
    for name, raw_info in sorted(inventory_models(conn.inventory or {}).items()):
        raw = stats.get(name)
        model_stats: dict[str, Any] = raw if isinstance(raw, dict) else {}
        info, load = infos.get(name), loads.get(name)
        loaded = getattr(load, "loaded", None)
        if loaded is None:
            loaded = model_stats.get("loaded", raw_info.get("loaded", True))
        context = (getattr(info, "n_ctx", None) or getattr(load, "n_ctx", None)
                   or raw_info.get("context_length"))
        load_time = getattr(load, "load_time_s", None) or getattr(info, "load_time_s", None)
        out.append({
            "name": name, "loaded": bool(loaded),
            "size_bytes": _plain(raw_info.get("size_bytes")),
            "memory_bytes": _plain(getattr(info, "memory_bytes", None)),
            "context_length": _plain(context),
            "source": _plain(raw_info.get("source")) or "gguf",
            "in_flight": conn.per_model.get(name, 0),
            "queued": getattr(load, "waiting", 0) if load is not None else 0,
            "decode_tps": _plain(getattr(load, "decode_tps", None)
                                 or model_stats.get("decode_tps")),
            "load_time_s": _plain(load_time if load_time is not None
                                  else raw_info.get("load_time_s")),
        })
    return out


def node_view(conn: NodeConn, now: float) -> dict[str, Any]:
    summary = node_summary(conn, now)
    telemetry = conn.telemetry if isinstance(conn.telemetry, dict) else {}
    return {**summary, "did": conn.did, "labels": dict(conn.labels), "suspect": conn.suspect,
            "gpus": gpus_of(telemetry), "model_detail": models_of(conn)}


def fleet(registry: Registry, now: float, limit: int | None = None) -> list[dict[str, Any]]:
    """The busiest nodes first (suspects before all), at most `limit` of them: a pane or a
    terminal watching 10,000 nodes shows the ones that need a look, and builds no more."""
    conns = sorted(registry.nodes(), key=lambda c: (not c.suspect, -c.in_flight, c.did))
    return [node_view(conn, now) for conn in conns[:limit]]


def models_across(registry: Registry, shown: int = 8) -> list[dict[str, Any]]:
    """Per model over every connected node: how many have it loaded or only on disk (the
    first `shown` of each named), requests in flight, context and load time reported."""
    by_model: dict[str, dict[str, Any]] = {}
    for conn in registry.nodes():
        for model in models_of(conn):
            entry = by_model.setdefault(model["name"], {
                "name": model["name"], "loaded_on": [], "on_disk": [], "loaded": 0,
                "disk": 0, "in_flight": 0, "queued": 0,
                "context_length": model.get("context_length"),
                "load_time_s": model.get("load_time_s")})
            kind = "loaded" if model["loaded"] else "disk"
            entry[kind] += 1
            names = entry["loaded_on" if model["loaded"] else "on_disk"]
            if len(names) < shown:
                names.append(conn.did)
            entry["in_flight"] += model.get("in_flight") or 0
            entry["queued"] += model.get("queued") or 0
            if entry["load_time_s"] is None:
                entry["load_time_s"] = model.get("load_time_s")
    return [by_model[k] for k in sorted(by_model)]
