"""The web pane's HTML: Jinja2 templates (autoescaped) and the filters they use.

Every fragment is rendered from plain dicts (the admin operations' and the
live snapshot's), so the page shows exactly what the admin API returns.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from coordinator.fleet_view import short_did

GIB = 1024**3
DASH = "\u2013"  # what a missing figure shows


def gib(value: Any, digits: int = 1) -> str:
    return f"{value / GIB:.{digits}f}" if isinstance(value, int | float) else "?"


def size(value: Any) -> str:
    if not isinstance(value, int | float):
        return ""
    return f"{value / GIB:.1f} GiB" if value >= GIB / 2 else f"{value / 1024**2:.0f} MiB"


def num(value: Any, fmt: str = ".0f", unit: str = "") -> str:
    return f"{value:{fmt}}{unit}" if isinstance(value, int | float) else DASH


def mbs(kb_s: Any) -> str:
    """NVML's PCIe throughput (KB/s) as MB/s."""
    return f"{kb_s / 1024:.0f} MB/s" if isinstance(kb_s, int | float) else DASH


def ago(ts: Any, now: float | None = None) -> str:
    if not isinstance(ts, int | float):
        return "never"
    seconds = max(0, int((now or time.time()) - ts))
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds // span}{unit} ago"
    return f"{seconds}s ago"


def until(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "?"
    seconds = int(ts - time.time())
    if seconds <= 0:
        return "expired"
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"in {seconds // span}{unit}"
    return f"in {seconds}s"


def clock(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "?"
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")


def pct(part: Any, whole: Any) -> float:
    if isinstance(part, int | float) and isinstance(whole, int | float) and whole > 0:
        return max(0.0, min(100.0, 100.0 * part / whole))
    return 0.0


ENV = Environment(loader=PackageLoader("coordinator", "ui/templates"),
                  autoescape=select_autoescape(default=True), trim_blocks=True,
                  lstrip_blocks=True)
ENV.filters.update(gib=gib, size=size, num=num, mbs=mbs, ago=ago, until=until, clock=clock,
                   short=short_did)
ENV.globals.update(pct=pct)


def render(template: str, **context: Any) -> str:
    return ENV.get_template(template).render(**context)
