"""`meshgate-node status`: one telemetry sample as a table a person can read (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _gib(n: Any) -> str:
    return "-" if not isinstance(n, int | float) else f"{n / 2**30:.1f} GiB"


def _num(n: Any, fmt: str = "{:.1f}") -> str:
    return "-" if not isinstance(n, int | float) or isinstance(n, bool) else fmt.format(n)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
        for row in [header, *rows]
    ]


def render_status(sample: dict[str, Any]) -> str:
    host = sample.get("host") or {}
    gpus = [g for g in sample.get("gpus") or [] if isinstance(g, dict)]
    runtime = sample.get("runtime") or {}
    load = host.get("load_avg") or []
    cores = host.get("cpu_util_pct_per_core") or []
    lines = [
        "HOST",
        f"  cpu     {host.get('cpu_count', '-')} cores, {_num(host.get('cpu_util_pct'))}% busy"
        f" (per core: {' '.join(_num(c, '{:.0f}') for c in cores) or '-'}),"
        f" load {' '.join(_num(x, '{:.2f}') for x in load) or '-'}",
        f"  memory  {_gib(host.get('mem_available_bytes'))} free of "
        f"{_gib(host.get('mem_total_bytes'))}; swap {_gib(host.get('swap_used_bytes'))} used of "
        f"{_gib(host.get('swap_total_bytes'))}",
    ]
    for d, free in (host.get("disk_free_bytes") or {}).items():
        lines.append(f"  disk    {d}: {_gib(free) if free is not None else 'missing'} free")
    lines.append("")
    if gpus:
        lines.append("GPUS")
        rows = [
            [
                str(g.get("index")),
                str(g.get("name") or "-"),
                f"{_gib(g.get('vram_used_bytes'))} / {_gib(g.get('vram_total_bytes'))}",
                _num(g.get("gpu_util_pct"), "{:.0f}%"),
                _num(g.get("temperature_c"), "{:.0f}C"),
                _num(g.get("power_draw_w"), "{:.0f} W"),
                f"gen{g.get('pcie_gen_current') or '-'} x{g.get('pcie_width_current') or '-'}",
                ",".join(g.get("unavailable") or []) or "-",
            ]
            for g in gpus
        ]
        header = ["#", "NAME", "VRAM USED", "UTIL", "TEMP", "POWER", "PCIE", "UNREADABLE"]
        lines += ["  " + r for r in table(header, rows)]
        driver = (sample.get("nvml") or {}).get("driver_version")
        if driver:
            lines.append(f"  driver {driver}")
    else:
        why = (sample.get("nvml") or {}).get("unavailable_reason")
        lines.append(f"GPUS    none ({why or 'CPU-only box, or no NVIDIA driver'})")
    lines.append("")
    models = {k: v for k, v in runtime.items() if isinstance(v, dict)}
    if models:
        lines.append("MODELS")
        rows = [
            [
                name,
                str(m.get("kind") or "-"),
                "yes" if m.get("loaded", True) else "no",
                _gib(m.get("rss_bytes")) if m.get("rss_bytes") else "-",
                str(m.get("in_flight", 0)),
                str(m.get("queue", m.get("queued", 0))),
                _num(m.get("prefill_tps")),
                _num(m.get("decode_tps")),
                str(m.get("served", "-")),
                str(m.get("crashes", 0)),
            ]
            for name, m in sorted(models.items())
        ]
        header = [
            "NAME",
            "KIND",
            "LOADED",
            "MEMORY",
            "IN FLIGHT",
            "QUEUED",
            "PROMPT TOK/S",
            "GEN TOK/S",
            "SERVED",
            "CRASHES",
        ]
        lines += ["  " + r for r in table(header, rows)]
    else:
        lines.append("MODELS  none served")
    if "error" in runtime:
        lines.append(f"  runtime stats failed: {runtime['error']}")
    return "\n".join(lines)
