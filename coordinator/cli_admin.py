"""The admin commands: tokens, keys, nodes, usage; locally or over `--url`.

Each command asks an `Admin` (`admin_client.open_admin`): the admin API when a
URL is given, else the database in the state directory. Output meant for
scripts is on stdout (a token or a key is always the last line; `--json` is
one document); everything meant for a person goes to stderr.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import typer

from coordinator.admin_client import AdminCallError, open_admin
from coordinator.admin_ops import Admin
from coordinator.cli_common import (
    ADMIN_KEY_FILE,
    JSON_OUT,
    STATE_DIR,
    URL,
    ago,
    fail,
    parse_duration,
    parse_labels,
    parse_since,
    table,
)
from coordinator.errors import CoordinatorError
from coordinator.store import iso

token_app = typer.Typer(
    rich_markup_mode=None,  # click's plain help: rich's panels label every flag <bool>
    help="Enrollment tokens for new nodes.", no_args_is_help=True)
key_app = typer.Typer(
    rich_markup_mode=None,  # click's plain help: rich's panels label every flag <bool>
    help="API keys for apps.", no_args_is_help=True)
node_app = typer.Typer(
    rich_markup_mode=None,  # click's plain help: rich's panels label every flag <bool>
    help="One enrolled node.", no_args_is_help=True)
GIB = 1024**3


@contextmanager
def admin(state_dir: Path, url: str | None, key_file: Path | None) -> Iterator[Admin]:
    """An Admin; its errors become a message and exit code 2 (1: could not reach it)."""
    try:
        with open_admin(state_dir, url, key_file) as ops:
            yield ops
    except AdminCallError as exc:
        raise fail(str(exc), 2 if 400 <= exc.status < 500 else 1) from None
    except CoordinatorError as exc:
        raise fail(str(exc), 2) from None


def register(app: typer.Typer) -> None:
    app.add_typer(token_app, name="token")
    app.add_typer(key_app, name="key")
    app.add_typer(node_app, name="node")
    app.command("nodes")(nodes)
    app.command("usage")(usage)


# ----------------------------------------------------------------------------- tokens


@token_app.command("create")
def token_create(
    state_dir: Path = STATE_DIR,
    ttl: str = typer.Option("1h", help="How long the token works: 30s, 15m, 1h, 7d."),
    uses: int = typer.Option(1, "--uses", help="How many nodes may enroll with it (a fleet "
                             "rollout: one token for 500 boxes); each use is recorded."),
    label: list[str] = typer.Option([], "--label", help="key=value given to the node; repeatable."),
    tunnel_url: str | None = typer.Option(
        None, help="The ws:// address nodes dial (default: what the coordinator advertises)."
    ),
    url: str | None = URL,
    admin_key_file: Path | None = ADMIN_KEY_FILE,
) -> None:
    """Make an enrollment token; the token is the last line of stdout."""
    try:
        ttl_s = parse_duration(ttl)
        labels = parse_labels(label)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    if uses < 1:
        raise fail("--uses must be at least 1", 2)
    if tunnel_url is not None and not tunnel_url.startswith(("ws://", "wss://")):
        raise fail(f"--tunnel-url must start with ws:// or wss://, not {tunnel_url!r}", 2)
    with admin(state_dir, url, admin_key_file) as ops:
        made = ops.create_token(ttl_s=ttl_s, uses=uses, labels=labels, tunnel_url=tunnel_url)
    if urlsplit(made["url"]).hostname in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: {made['url']} is a loopback address, so only nodes on this box "
                   "can use this token; start serve with --advertise-url or pass --tunnel-url",
                   err=True)
    shown = ", ".join(f"{k}={v}" for k, v in labels.items()) or "none"
    works = "works once" if uses == 1 else f"works for {uses} nodes"
    typer.echo(f"enrollment token {made['token_id']} for {made['url']}, {works} until "
               f"{iso(made['expires_at'])}, labels: {shown}", err=True)
    typer.echo("on the new node run: meshgate-node enroll TOKEN", err=True)
    typer.echo(made["token"])


@token_app.command("list")
def token_list(state_dir: Path = STATE_DIR, as_json: bool = JSON_OUT, url: str | None = URL,
               admin_key_file: Path | None = ADMIN_KEY_FILE) -> None:
    """Every enrollment token: state, uses, expiry, labels (never a secret)."""
    with admin(state_dir, url, admin_key_file) as ops:
        tokens = ops.list_tokens()
    if as_json:
        typer.echo(json.dumps(tokens, indent=2))
        return
    now = time.time()
    table(["TOKEN ID", "STATE", "USES", "EXPIRES", "LAST USED BY", "LABELS"], [
        [t["token_id"], t["state"], f"{t['uses']}/{t['max_uses']}", iso(t["expires_at"]),
         f"{t['used_by']} ({ago(t['used_at'], now)})" if t["used_by"] else "-",
         ",".join(f"{k}={v}" for k, v in t["labels"].items()) or "-"]
        for t in tokens])


@token_app.command("revoke")
def token_revoke(token_id: str = typer.Argument(..., help="The token's id."),
                 state_dir: Path = STATE_DIR, url: str | None = URL,
                 admin_key_file: Path | None = ADMIN_KEY_FILE) -> None:
    """Refuse a token's remaining uses (nodes it enrolled stay enrolled)."""
    with admin(state_dir, url, admin_key_file) as ops:
        done = ops.revoke_token(token_id)
    typer.echo(f"revoked enrollment token {token_id}" if done["revoked"]
               else f"enrollment token {token_id} was already revoked")


# ----------------------------------------------------------------------------- keys


def _split_models(values: list[str]) -> list[str] | None:
    """`--models 'a,llama-*'` and repeated `--model a` -> the patterns, or None (every model)."""
    models = [m.strip() for v in values for m in v.split(",") if m.strip()]
    return models or None


def limits_text(key: dict[str, Any]) -> str:
    parts = []
    if key.get("rpm"):
        parts.append(f"{key['rpm']} rpm")
    if key.get("tpm"):
        parts.append(f"{key['tpm']} tpm")
    if key.get("budget_day") is not None:
        parts.append(f"{key['budget_day']:g}/day")
    if key.get("budget_month") is not None:
        parts.append(f"{key['budget_month']:g}/month")
    return ", ".join(parts) or "-"


@key_app.command("create")
def key_create(
    name: str = typer.Option(..., "--name", help="Who or what uses the key."),
    models: list[str] = typer.Option(
        [], "--models", "--model",
        help="Models the key may use, comma-separated globs (smollm2,llama-*); repeatable."),
    prefer: str | None = typer.Option(
        None, help="Route policy when a request names none: speed, cost, local or quality."),
    label: list[str] = typer.Option(
        [], "--label", help="key=value every serving node must carry (residency); repeatable."),
    rpm: int | None = typer.Option(None, "--rpm", help="Requests per minute."),
    tpm: int | None = typer.Option(None, "--tpm", help="Tokens per minute (prompt + output)."),
    budget_day: float | None = typer.Option(None, "--budget-day", help="Money per UTC day."),
    budget_month: float | None = typer.Option(
        None, "--budget-month", help="Money per UTC calendar month."),
    state_dir: Path = STATE_DIR,
    url: str | None = URL,
    admin_key_file: Path | None = ADMIN_KEY_FILE,
) -> None:
    """Make an API key; the key is the last line of stdout and is shown only once."""
    try:
        labels = parse_labels(label)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    scopes = {k: v for k, v in {
        "models": _split_models(models), "prefer": prefer, "labels": labels or None,
        "rpm": rpm, "tpm": tpm, "budget_day": budget_day, "budget_month": budget_month,
    }.items() if v is not None}
    with admin(state_dir, url, admin_key_file) as ops:
        made = ops.create_key(name, scopes)
    scope = ", ".join(made["models"]) if made["models"] else "every model"
    typer.echo(f"API key {made['key_id']} ({made['name']}) for {scope}; limits: "
               f"{limits_text(made)}; store it now, it cannot be shown again", err=True)
    typer.echo(made["key"])


@key_app.command("list")
def key_list(state_dir: Path = STATE_DIR, as_json: bool = JSON_OUT, url: str | None = URL,
             admin_key_file: Path | None = ADMIN_KEY_FILE) -> None:
    """Every API key with its scopes (never their secrets)."""
    with admin(state_dir, url, admin_key_file) as ops:
        keys = ops.list_keys()
    if as_json:
        typer.echo(json.dumps(keys, indent=2))
        return
    table(["KEY ID", "NAME", "STATE", "CREATED", "MODELS", "PREFER", "LABELS", "LIMITS"], [
        [k["key_id"], k["name"], k["state"], iso(k["created_at"]),
         ",".join(k["models"]) if k["models"] else "*", k["prefer"] or "-",
         ",".join(f"{a}={b}" for a, b in k["labels"].items()) or "-", limits_text(k)]
        for k in keys
    ])


@key_app.command("revoke")
def key_revoke(
    key: str = typer.Argument(..., help="The key's id or name."), state_dir: Path = STATE_DIR,
    url: str | None = URL, admin_key_file: Path | None = ADMIN_KEY_FILE,
) -> None:
    """Revoke an API key: a running coordinator refuses it within a second."""
    with admin(state_dir, url, admin_key_file) as ops:
        done = ops.revoke_key(key)
    typer.echo(f"revoked API key {key}" if done["revoked"]
               else f"API key {key} was already revoked")


@key_app.command("rotate")
def key_rotate(
    key: str = typer.Argument(..., help="The key's id or name."), state_dir: Path = STATE_DIR,
    url: str | None = URL, admin_key_file: Path | None = ADMIN_KEY_FILE,
) -> None:
    """Give a key a new secret (same id, name and scopes); the new key is the last line."""
    with admin(state_dir, url, admin_key_file) as ops:
        made = ops.rotate_key(key)
    typer.echo(f"rotated API key {key}; the old secret stops working within a second", err=True)
    typer.echo(made["key"])


# ----------------------------------------------------------------------------- nodes


def _gib(value: Any) -> str:
    return f"{value / GIB:.1f}" if isinstance(value, int | float) else "?"


def live_columns(summary: dict[str, Any] | None) -> list[str]:
    """RTT, in flight, CPU, memory and GPU columns of one node's live summary."""
    if summary is None:
        return ["-", "-", "-", "-", "-"]
    rtt, cpu, load = summary.get("rtt_ms"), summary.get("cpu_util_pct"), summary.get("load_1m")
    cpu_text = "?" if cpu is None else f"{cpu:.0f}%"
    if load is not None:
        cpu_text += f" ld {load:.1f}"
    total, avail = summary.get("mem_total_bytes"), summary.get("mem_available_bytes")
    used = (total - avail if isinstance(total, int | float) and isinstance(avail, int | float)
            else None)
    gpus = [
        f"{(g.get('name') or '?').removeprefix('NVIDIA ')} {_gib(g.get('vram_used_bytes'))}/"
        f"{_gib(g.get('vram_total_bytes'))}G"
        + (f" {g['gpu_util_pct']:.0f}%" if g.get("gpu_util_pct") is not None else "")
        for g in summary.get("gpus") or []
    ]
    return ["?" if rtt is None else f"{rtt:.1f}ms", str(summary.get("in_flight", 0)), cpu_text,
            f"{_gib(used)}/{_gib(total)}G", "; ".join(gpus) or "cpu only"]


def models_column(models: list[str], summary: dict[str, Any] | None) -> str:
    """Served models; with a live view, the loaded ones marked with a *."""
    if summary is None:
        return ",".join(models) or "-"
    loaded = set(summary.get("loaded") or [])
    names = summary.get("models") or models
    return ",".join(f"{m}*" if m in loaded else m for m in names) or "-"


def nodes(state_dir: Path = STATE_DIR, as_json: bool = JSON_OUT, url: str | None = URL,
          admin_key_file: Path | None = ADMIN_KEY_FILE) -> None:
    """Every enrolled node: state, labels, models; live round trip, load, memory and GPUs
    for the connected ones (from the running server's live view)."""
    now = time.time()
    with admin(state_dir, url, admin_key_file) as ops:
        listed = ops.list_nodes()
    records = listed["nodes"]
    if as_json:
        typer.echo(json.dumps(records, indent=2))
        return
    if not listed["serving"]:
        typer.echo("(no coordinator is serving from this state dir: no node is connected)")
    table(
        ["DID", "STATE", "LABELS", "LAST SEEN", "RTT", "INFLIGHT", "CPU", "MEM", "GPUS",
         "MODELS"],
        [[n["did"], n["state"], ",".join(f"{k}={v}" for k, v in n["labels"].items()) or "-",
          ago(n["last_seen"], now), *live_columns(n["live"]), models_column(n["models"], n["live"])]
         for n in records],
    )


@node_app.command("revoke")
def node_revoke(
    did: str = typer.Argument(..., help="The node's did:key."), state_dir: Path = STATE_DIR,
    url: str | None = URL, admin_key_file: Path | None = ADMIN_KEY_FILE,
) -> None:
    """Revoke a node: its tunnel is closed and it is refused from its next handshake on."""
    with admin(state_dir, url, admin_key_file) as ops:
        done = ops.revoke_node(did)
    typer.echo(f"revoked node {did}" if done["revoked"] else f"node {did} was already revoked")


# ----------------------------------------------------------------------------- usage


def usage(
    state_dir: Path = STATE_DIR,
    since: str | None = typer.Option(
        None, help="An ISO date or time (2026-11-01), or a duration back from now (24h)."),
    by: str = typer.Option("model", help="Group by key, node (or cloud upstream) or model."),
    as_json: bool = JSON_OUT,
    as_csv: bool = typer.Option(False, "--csv", help="CSV on stdout, the last row the total."),
    url: str | None = URL,
    admin_key_file: Path | None = ADMIN_KEY_FILE,
) -> None:
    """Requests, tokens, latency, cost and energy (joules, J per 1k tokens; '-' where the
    node could not measure it) from the usage ledger, per key, node or model, with the total."""
    if by not in ("key", "node", "model"):
        raise fail(f"bad --by {by!r}: use key, node or model", 2)
    try:
        start = parse_since(since, time.time()) if since else None
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    with admin(state_dir, url, admin_key_file) as ops:
        report = ops.usage(by, start)
    rows, total = report["groups"], report["total"]
    named = by == "key"
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    elif as_csv:
        header = [by, *(["name"] if named else []), "requests", "ok", "prompt_tokens",
                  "completion_tokens", "avg_latency_ms", "cost", "joules",
                  "joules_per_1k_tokens", "energy_cost"]
        writer = csv.DictWriter(sys.stdout, fieldnames=header, lineterminator="\n",
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow({by: "TOTAL", **({"name": ""} if named else {}), **total})
    else:
        table([by.upper(), "REQUESTS", "OK", "PROMPT", "COMPLETION", "AVG MS", "COST", "J",
               "J/1K TOK"], [
            *([r[by] + (f" ({r['name']})" if named and r.get("name", "-") != "-" else ""),
               str(r["requests"]), str(r["ok"]), str(r["prompt_tokens"]),
               str(r["completion_tokens"]), f"{r['avg_latency_ms']:.0f}", f"{r['cost']:.4f}",
               *_energy_cells(r.get("joules"), r.get("joules_per_1k_tokens"))]
              for r in rows),
            ["TOTAL", str(total["requests"]), str(total["ok"]), str(total["prompt_tokens"]),
             str(total["completion_tokens"]), f"{total['avg_latency_ms']:.0f}",
             f"{total['cost']:.4f}",
             *_energy_cells(total.get("joules"), total.get("joules_per_1k_tokens"))],
        ])


def _energy_cells(joules: float | None, per_1k: float | None) -> list[str]:
    """J and J per 1k tokens; '-' where nothing was measured."""
    return ["-" if joules is None else f"{joules:.1f}",
            "-" if per_1k is None else f"{per_1k:.1f}"]
