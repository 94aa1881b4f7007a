"""`meshgate-coordinator top`'s frame, rendered from a live snapshot as the admin API
returns it: node names and reported strings are shown as they are, never as rich markup
or emoji."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from coordinator.cli_top import render

SNAPSHOT: dict[str, Any] = {
    "node_count": 3,
    "nodes": [{
        "did": "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
        "labels": {"site": "lab"}, "rtt_ms": 1.25, "in_flight": 2, "cpu_util_pct": 40.0,
        "mem_total_bytes": 32 * 2**30, "mem_available_bytes": 24 * 2**30,
        "gpus": [{"name": "NVIDIA GeForce RTX 4090", "vram_used_bytes": 6 * 2**30,
                  "vram_total_bytes": 24 * 2**30, "gpu_util_pct": 97, "temperature_c": 71,
                  "power_draw_w": 402.0, "pcie_gen_current": 4, "pcie_width_current": 16}],
        "model_detail": [{"name": "[bold]tiny", "loaded": True}],
    }],
    "traffic": {"requests_per_s": 1.5, "tokens_per_s": 88.0, "p50_ms": 120.0, "p99_ms": 900.0,
                "errors": 2},
    "requests": [{"request_id": "req_1", "model": "tiny", "endpoint": "chat/completions",
                  "target": "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
                  "chunks": 4, "age_s": 0.5}],
}


def frame(snapshot: dict[str, Any]) -> str:
    console = Console(record=True, width=220, emoji=False, color_system=None)
    console.print(render(snapshot))
    return console.export_text()


def test_a_frame_shows_nodes_gpus_traffic_and_requests() -> None:
    text = frame(SNAPSHOT)
    assert "3 node(s) connected (the 1 busiest shown)" in text
    assert "z6Mk…ta2doK" in text  # a did's tail, as the pane shows it
    assert "site=lab" in text
    assert "RTX 4090 6.0/24G 97% 71C 402W PCIe4x16" in text
    assert "[bold]tiny" in text  # a model's name is not markup
    assert "🔑" not in text
    assert "1.50 req/s" in text
    assert "2 errors" in text
    assert "req_1" in text
