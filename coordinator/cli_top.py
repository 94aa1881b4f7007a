"""`meshgate-coordinator top`: the fleet and its traffic, live in the terminal.

A rich `Live` table over the admin API's `/admin/v1/live`, refreshed every
`--interval` seconds: one row per connected node (round trip, in flight,
CPU, memory, each GPU's VRAM, utilisation, temperature and power, models
loaded and on disk), then traffic over the last minute and the requests in
flight. With no `--url` it watches the coordinator serving from the state
directory (its advertised API address and its `admin.key`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from coordinator.admin_client import AdminCallError, RemoteAdmin, admin_key_for, load_config
from coordinator.cli_common import ADMIN_KEY_FILE, STATE_DIR, URL, fail
from coordinator.errors import CoordinatorError
from coordinator.fleet_view import short_did
from coordinator.state import StateDir

GIB = 1024**3


def _num(value: Any, fmt: str, unit: str = "") -> str:
    return f"{value:{fmt}}{unit}" if isinstance(value, int | float) else "-"


def _gpu_text(gpu: dict[str, Any]) -> str:
    name = (gpu.get("name") or "GPU").removeprefix("NVIDIA ").removeprefix("GeForce ")
    used, total = gpu.get("vram_used_bytes"), gpu.get("vram_total_bytes")
    vram = (f"{used / GIB:.1f}/{total / GIB:.0f}G"
            if isinstance(used, int | float) and isinstance(total, int | float) else "?")
    pcie = (f" PCIe{gpu['pcie_gen_current']}x{gpu.get('pcie_width_current') or '?'}"
            if gpu.get("pcie_gen_current") else "")
    return (f"{name} {vram} {_num(gpu.get('gpu_util_pct'), '.0f', '%')} "
            f"{_num(gpu.get('temperature_c'), '.0f', 'C')} "
            f"{_num(gpu.get('power_draw_w'), '.0f', 'W')}{pcie}")


def fleet_table(snapshot: dict[str, Any]) -> Table:
    nodes = snapshot.get("nodes") or []
    count = snapshot.get("node_count", len(nodes))
    busiest = f" (the {len(nodes)} busiest shown)" if count > len(nodes) else ""
    out = Table(title=f"meshgate fleet: {count} node(s) connected{busiest}", expand=True,
                title_justify="left")
    for column in ("node", "rtt", "in flight", "cpu", "memory", "gpus", "models"):
        out.add_column(column, overflow="fold")
    for node in nodes:
        total, avail = node.get("mem_total_bytes"), node.get("mem_available_bytes")
        mem = (f"{(total - avail) / GIB:.1f}/{total / GIB:.0f}G"
               if isinstance(total, int | float) and isinstance(avail, int | float) else "-")
        models = Text()
        for model in node.get("model_detail") or []:
            models.append(model["name"] + " ", style="bold green" if model["loaded"] else "dim")
        labels = " ".join(f"{k}={v}" for k, v in (node.get("labels") or {}).items())
        out.add_row(
            Text(short_did(node.get("did")) + (f"\n{labels}" if labels else "")),
            Text(_num(node.get("rtt_ms"), ".1f", "ms")), Text(str(node.get("in_flight", 0))),
            Text(_num(node.get("cpu_util_pct"), ".0f", "%")), Text(mem),
            Text("\n".join(_gpu_text(g) for g in node.get("gpus") or []) or "cpu only"),
            models)
    return out


def traffic_text(snapshot: dict[str, Any]) -> Text:
    t = snapshot.get("traffic") or {}
    return Text.assemble(
        ("last minute  ", "bold"),
        f"{_num(t.get('requests_per_s'), '.2f')} req/s   ",
        f"{_num(t.get('tokens_per_s'), '.1f')} tok/s   ",
        f"p50 {_num(t.get('p50_ms'), '.0f', ' ms')}   p99 {_num(t.get('p99_ms'), '.0f', ' ms')}   ",
        (f"{t.get('errors', 0)} errors", "red" if t.get("errors") else ""),
    )


def requests_table(snapshot: dict[str, Any]) -> Table:
    out = Table(title="requests in flight", expand=True, title_justify="left")
    for column in ("request", "model", "endpoint", "on", "chunks", "age"):
        out.add_column(column)
    for r in snapshot.get("requests") or []:
        out.add_row(*(Text(cell) for cell in (
            str(r.get("request_id") or "-"), str(r.get("model") or "-"), str(r.get("endpoint")),
            short_did(r["target"]) if r.get("target") else "scheduling",
            str(r.get("chunks")), _num(r.get("age_s"), ".1f", "s"))))
    return out


def render(snapshot: dict[str, Any]) -> Group:
    return Group(fleet_table(snapshot), traffic_text(snapshot), requests_table(snapshot))


def top(
    state_dir: Path = STATE_DIR,
    url: str | None = URL,
    admin_key_file: Path | None = ADMIN_KEY_FILE,
    interval: float = typer.Option(1.0, "--interval", help="Seconds between refreshes."),
    rows: int = typer.Option(30, "--nodes", help="At most this many nodes, the busiest first."),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit (for scripts)."),
) -> None:
    """Watch the fleet and its traffic live (rich table over the admin API)."""
    if not interval > 0 or rows < 0:
        raise fail("--interval must be positive and --nodes 0 or more", 2)
    try:
        config = load_config()
        url = url or config.url
        if url is None:
            advertised = StateDir(state_dir).read_advertise() if state_dir.is_dir() else None
            if advertised is None:
                raise CoordinatorError(f"no coordinator has served from {state_dir}: "
                                       "pass --url")
            url = advertised.api_url
        admin = RemoteAdmin(url, admin_key_for(state_dir, admin_key_file, config))
    except CoordinatorError as exc:
        raise fail(str(exc), 2) from None
    console = Console(emoji=False)  # a did:key: is not the key emoji
    try:
        if once:
            console.print(render(admin.live(rows)))
            return
        with Live(render(admin.live(rows)), console=console, screen=False,
                  refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                live.update(render(admin.live(rows)))
    except AdminCallError as exc:
        raise fail(str(exc), 2 if 400 <= exc.status < 500 else 1) from None
    except KeyboardInterrupt:
        pass
    finally:
        admin.close()
