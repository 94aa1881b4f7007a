"""`meshgate-coordinator`: run the coordinator, and administer it from the same box.

Every admin command works on the store in the state directory directly, so it
works the same whether the server runs or not. Output meant for scripts is on
stdout (a token or a key is always the last line; `--json` is one document);
everything meant for a person goes to stderr.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import typer

from coordinator.errors import CoordinatorError
from coordinator.live import LIVE_FILE, read_live
from coordinator.state import ServeOptions, StateDir
from coordinator.store import (
    ApiKeyRecord,
    KeyScopes,
    NodeRecord,
    Store,
    UsageGroup,
    UsageTotal,
    iso,
)

app = typer.Typer(help="meshgate coordinator", no_args_is_help=True, add_completion=False)
token_app = typer.Typer(help="Enrollment tokens for new nodes.", no_args_is_help=True)
key_app = typer.Typer(help="API keys for apps.", no_args_is_help=True)
node_app = typer.Typer(help="One enrolled node.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(key_app, name="key")
app.add_typer(node_app, name="node")

STATE_DIR = typer.Option(
    Path("/var/lib/meshgate/coordinator"), "--state-dir", envvar="MESHGATE_COORDINATOR_STATE",
    help="Where the coordinator keeps its key, database and advertised addresses.",
)
JSON_OUT = typer.Option(False, "--json", help="One JSON document on stdout.")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def _store(state_dir: Path) -> Iterator[tuple[StateDir, Store]]:
    """The state dir and its store; store errors become a message and exit code 2."""
    try:
        state = StateDir(state_dir)
        store = Store(state.db_url)
    except CoordinatorError as exc:
        raise _fail(str(exc)) from None
    try:
        yield state, store
    except CoordinatorError as exc:
        raise _fail(str(exc), 2) from None
    finally:
        store.close()


def parse_duration(text: str) -> int:
    """`30s`, `15m`, `1h`, `7d` (a bare number is seconds) -> seconds; ValueError if not."""
    match = _DURATION.match(text)
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"bad duration {text!r}: use a positive number with s, m, h or d, "
                         "such as 30s, 15m, 1h or 7d")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def parse_labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or any(c.isspace() for c in key.strip()):
            raise ValueError(f"bad label {pair!r}: write it as key=value, such as site=lab-1")
        labels[key.strip()] = value.strip()
    return labels


def parse_since(text: str, now: float) -> float:
    """An ISO date or time (UTC unless it says otherwise), or a duration back from now."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"bad --since {text!r}: give an ISO time (2025-01-31T12:00Z) "
                         "or a duration back from now (1h, 7d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        typer.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    seconds = max(0, int(now - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


# ----------------------------------------------------------------------------- serve


@app.command()
def serve(
    state_dir: Path = STATE_DIR,
    api_host: str = typer.Option("0.0.0.0", envvar="MESHGATE_API_HOST"),  # noqa: S104
    api_port: int = typer.Option(8470, envvar="MESHGATE_API_PORT"),
    tunnel_host: str = typer.Option("0.0.0.0", envvar="MESHGATE_TUNNEL_HOST"),  # noqa: S104
    tunnel_port: int = typer.Option(8471, envvar="MESHGATE_TUNNEL_PORT"),
    advertise_url: str | None = typer.Option(
        None, envvar="MESHGATE_ADVERTISE_URL",
        help="The ws:// or wss:// address nodes should dial, if not the tunnel's own.",
    ),
    log_level: str = typer.Option("info", envvar="MESHGATE_LOG_LEVEL"),
    cache: bool = typer.Option(
        False, "--cache/--no-cache", envvar="MESHGATE_CACHE",
        help="Answer repeated deterministic requests (temperature 0, same body, same key) "
        "from an in-memory cache.",
    ),
    cache_ttl: str = typer.Option("5m", help="How long a cached answer lives: 30s, 5m, 1h."),
    cache_entries: int = typer.Option(1024, help="At most this many cached answers (LRU)."),
    log_format: str = typer.Option(
        "json", envvar="MESHGATE_LOG_FORMAT", help="json (one object a line) or text."),
    config: Path | None = typer.Option(
        None, "--config", envvar="MESHGATE_COORDINATOR_CONFIG",
        help="coordinator.toml: cloud upstreams, aliases, task routes, dispatch limits "
        "(default: /etc/meshgate/coordinator.toml if it exists).",
    ),
    database_url: str | None = typer.Option(
        None, "--database-url", envvar="MESHGATE_COORDINATOR_DB_URL",
        help="postgresql://USER:PASS@HOST/DB to share the store with other replicas "
        "(needs meshgate[postgres]); default: SQLite in the state directory.",
    ),
    redis_url: str | None = typer.Option(
        None, "--redis-url", envvar="MESHGATE_REDIS_URL",
        help="redis://HOST:PORT/DB: run as one replica of a cluster, sharing rate limits, "
        "budgets, the cache and revocations (needs meshgate[redis]); default: in memory.",
    ),
    cluster_key: Path | None = typer.Option(
        None, "--cluster-key", envvar="MESHGATE_CLUSTER_KEY",
        help="The tunnel key file every replica shares (nodes pin it); default: the state "
        "directory's own key.",
    ),
) -> None:
    """Run the public API and the tunnel endpoint."""
    if advertise_url is not None and not advertise_url.startswith(("ws://", "wss://")):
        raise _fail(f"--advertise-url must start with ws:// or wss://, not {advertise_url!r}", 2)
    if log_format not in ("json", "text"):
        raise _fail(f"--log-format must be json or text, not {log_format!r}", 2)
    try:
        cache_ttl_s = parse_duration(cache_ttl)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    if cache_entries <= 0:
        raise _fail("--cache-entries must be positive", 2)
    from coordinator.config import resolve_config
    from coordinator.engines import Engines
    from coordinator.server import run_server

    try:
        loaded = resolve_config(config)
        engines = Engines(database_url or loaded.cluster.database_url,
                          redis_url or loaded.cluster.redis_url).checked()
    except CoordinatorError as exc:
        raise _fail(str(exc), 2) from None
    run_server(ServeOptions(
        state_dir=state_dir, api_host=api_host, api_port=api_port, tunnel_host=tunnel_host,
        tunnel_port=tunnel_port, advertise_url=advertise_url, log_level=log_level, config=config,
        cache=cache, cache_ttl_s=cache_ttl_s, cache_entries=cache_entries, log_format=log_format,
        database_url=engines.database_url, redis_url=engines.redis_url,
        static_key_file=cluster_key or loaded.cluster.key_file,
    ), loaded)


# ----------------------------------------------------------------------------- tokens


@token_app.command("create")
def token_create(
    state_dir: Path = STATE_DIR,
    ttl: str = typer.Option("1h", help="How long the token works: 30s, 15m, 1h, 7d."),
    label: list[str] = typer.Option([], "--label", help="key=value given to the node; repeatable."),
    tunnel_url: str | None = typer.Option(
        None, help="The ws:// address nodes dial (default: what the coordinator advertises)."
    ),
) -> None:
    """Make a one-time enrollment token; the token is the last line of stdout."""
    from tunnel.token import EnrollmentToken

    try:
        ttl_s = parse_duration(ttl)
        labels = parse_labels(label)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    if tunnel_url is not None and not tunnel_url.startswith(("ws://", "wss://")):
        raise _fail(f"--tunnel-url must start with ws:// or wss://, not {tunnel_url!r}", 2)
    with _store(state_dir) as (state, store):
        if tunnel_url is None:
            advertised = state.read_advertise()
            if advertised is None:
                raise _fail("no tunnel address known: start the coordinator first "
                            "or pass --tunnel-url", 2)
            tunnel_url = advertised.tunnel_url
        now = time.time()
        token_id, secret = store.create_token(ttl_s, labels, now)
        token = EnrollmentToken(url=tunnel_url, coordinator_key=state.static_public(),
                                token_id=token_id, secret=secret, expires_at=int(now + ttl_s))
    if urlsplit(tunnel_url).hostname in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: {tunnel_url} is a loopback address, so only nodes on this box can "
                   "use this token; start serve with --advertise-url or pass --tunnel-url",
                   err=True)
    shown = ", ".join(f"{k}={v}" for k, v in labels.items()) or "none"
    typer.echo(f"enrollment token {token_id} for {tunnel_url}, works once until "
               f"{iso(now + ttl_s)}, labels: {shown}", err=True)
    typer.echo("on the new node run: meshgate-node enroll TOKEN", err=True)
    typer.echo(token.encode())


# ----------------------------------------------------------------------------- keys


def _key_json(key: ApiKeyRecord) -> dict[str, Any]:
    scope = key.scope
    return {"key_id": key.key_id, "name": key.name, "created_at": key.created_at,
            "revoked_at": key.revoked_at, "models": key.models,
            "state": "revoked" if key.revoked_at is not None else "active",
            "prefer": scope.prefer, "labels": dict(scope.labels), "rpm": scope.rpm,
            "tpm": scope.tpm, "budget_day": scope.budget_day, "budget_month": scope.budget_month}


def _split_models(values: list[str]) -> tuple[str, ...] | None:
    """`--models 'a,llama-*'` and repeated `--model a` -> the patterns, or None (every model)."""
    models = tuple(m.strip() for v in values for m in v.split(",") if m.strip())
    return models or None


def _limits_text(key: ApiKeyRecord) -> str:
    scope = key.scope
    parts = []
    if scope.rpm:
        parts.append(f"{scope.rpm} rpm")
    if scope.tpm:
        parts.append(f"{scope.tpm} tpm")
    if scope.budget_day is not None:
        parts.append(f"{scope.budget_day:g}/day")
    if scope.budget_month is not None:
        parts.append(f"{scope.budget_month:g}/month")
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
) -> None:
    """Make an API key; the key is the last line of stdout and is shown only once."""
    try:
        scopes = KeyScopes(models=_split_models(models), prefer=prefer,
                           labels=parse_labels(label), rpm=rpm, tpm=tpm,
                           budget_day=budget_day, budget_month=budget_month)
    except (ValueError, CoordinatorError) as exc:
        raise _fail(str(exc), 2) from None
    with _store(state_dir) as (_, store):
        record, plaintext = store.create_key(name, time.time(), scopes=scopes)
    scope = ", ".join(record.models) if record.models else "every model"
    typer.echo(f"API key {record.key_id} ({record.name}) for {scope}; limits: "
               f"{_limits_text(record)}; store it now, it cannot be shown again", err=True)
    typer.echo(plaintext)


@key_app.command("list")
def key_list(state_dir: Path = STATE_DIR, as_json: bool = JSON_OUT) -> None:
    """Every API key with its scopes (never their secrets)."""
    with _store(state_dir) as (_, store):
        keys = store.list_keys()
    if as_json:
        typer.echo(json.dumps([_key_json(k) for k in keys], indent=2))
        return
    _table(["KEY ID", "NAME", "STATE", "CREATED", "MODELS", "PREFER", "LABELS", "LIMITS"], [
        [k.key_id, k.name, _key_json(k)["state"], iso(k.created_at),
         ",".join(k.models) if k.models else "*", k.scope.prefer or "-",
         ",".join(f"{a}={b}" for a, b in k.scope.labels.items()) or "-", _limits_text(k)]
        for k in keys
    ])


@key_app.command("revoke")
def key_revoke(
    key: str = typer.Argument(..., help="The key's id or name."), state_dir: Path = STATE_DIR
) -> None:
    """Revoke an API key at once."""
    with _store(state_dir) as (_, store):
        changed = store.revoke_key(key, time.time())
    typer.echo(f"revoked API key {key}" if changed else f"API key {key} was already revoked")


@key_app.command("rotate")
def key_rotate(
    key: str = typer.Argument(..., help="The key's id or name."), state_dir: Path = STATE_DIR
) -> None:
    """Give a key a new secret (same id, name and scopes); the new key is the last line."""
    with _store(state_dir) as (_, store):
        plaintext = store.rotate_key(key, time.time())
    typer.echo(f"rotated API key {key}; the old secret no longer works", err=True)
    typer.echo(plaintext)


# ----------------------------------------------------------------------------- nodes


def _node_state(node: NodeRecord, live: dict[str, dict[str, Any]] | None) -> str:
    if node.revoked_at is not None:
        return "revoked"
    if live is not None and node.did in live:
        return "connected"
    return "enrolled"


GIB = 1024**3


def _gib(value: Any) -> str:
    return f"{value / GIB:.1f}" if isinstance(value, int | float) else "?"


def _live_columns(summary: dict[str, Any] | None) -> list[str]:
    """RTT, in flight, CPU, memory and GPU columns of one node's live summary."""
    if summary is None:
        return ["-", "-", "-", "-", "-"]
    rtt = summary.get("rtt_ms")
    cpu = summary.get("cpu_util_pct")
    load = summary.get("load_1m")
    cpu_text = "?" if cpu is None else f"{cpu:.0f}%"
    if load is not None:
        cpu_text += f" ld {load:.1f}"
    total, avail = summary.get("mem_total_bytes"), summary.get("mem_available_bytes")
    used = (
        total - avail
        if isinstance(total, int | float) and isinstance(avail, int | float)
        else None
    )
    gpus = [
        f"{g.get('name', '?').removeprefix('NVIDIA ')} {_gib(g.get('vram_used_bytes'))}/"
        f"{_gib(g.get('vram_total_bytes'))}G"
        + (f" {g['gpu_util_pct']:.0f}%" if g.get("gpu_util_pct") is not None else "")
        for g in summary.get("gpus") or []
    ]
    return [
        "?" if rtt is None else f"{rtt:.1f}ms",
        str(summary.get("in_flight", 0)),
        cpu_text,
        f"{_gib(used)}/{_gib(total)}G",
        "; ".join(gpus) or "cpu only",
    ]


@app.command()
def nodes(state_dir: Path = STATE_DIR, as_json: bool = JSON_OUT) -> None:
    """Every enrolled node: state, labels, models; live round trip, load, memory and GPUs
    for the connected ones (from the running server's live view)."""
    now = time.time()
    with _store(state_dir) as (state, store):
        records = store.list_nodes()
        live = read_live(state.path / LIVE_FILE, now)
    if as_json:
        typer.echo(json.dumps([
            {**asdict(n), "state": _node_state(n, live),
             "connected": _node_state(n, live) == "connected",
             "live": (live or {}).get(n.did)}
            for n in records
        ], indent=2))
        return
    if live is None:
        typer.echo("(no coordinator is serving from this state dir: no node is connected)")
    _table(
        ["DID", "STATE", "LABELS", "LAST SEEN", "RTT", "INFLIGHT", "CPU", "MEM", "GPUS",
         "MODELS"],
        [
            [n.did, _node_state(n, live),
             ",".join(f"{k}={v}" for k, v in n.labels.items()) or "-",
             _ago(n.last_seen, now), *_live_columns((live or {}).get(n.did)),
             _models_column(n.models, (live or {}).get(n.did))]
            for n in records
        ],
    )


def _models_column(models: list[str], summary: dict[str, Any] | None) -> str:
    """Served models; with a live view, the loaded ones marked with a *."""
    if summary is None:
        return ",".join(models) or "-"
    loaded = set(summary.get("loaded") or [])
    names = summary.get("models") or models
    return ",".join(f"{m}*" if m in loaded else m for m in names) or "-"


@node_app.command("revoke")
def node_revoke(
    did: str = typer.Argument(..., help="The node's did:key."), state_dir: Path = STATE_DIR
) -> None:
    """Revoke a node: it is refused from its next handshake on."""
    with _store(state_dir) as (_, store):
        changed = store.revoke_node(did, time.time())
    typer.echo(f"revoked node {did}" if changed else f"node {did} was already revoked")


# ----------------------------------------------------------------------------- usage


def _usage_total(totals: list[UsageTotal]) -> dict[str, Any]:
    requests = sum(t.requests for t in totals)
    return {
        "requests": requests, "ok": sum(t.ok for t in totals),
        "prompt_tokens": sum(t.prompt_tokens for t in totals),
        "completion_tokens": sum(t.completion_tokens for t in totals),
        "avg_latency_ms": (sum(t.avg_latency_ms * t.requests for t in totals) / requests
                           if requests else 0.0),
        "cost": sum(t.cost for t in totals),
    }


@app.command()
def usage(
    state_dir: Path = STATE_DIR,
    since: str | None = typer.Option(
        None, help="An ISO date or time (2026-11-01), or a duration back from now (24h)."),
    by: str = typer.Option("model", help="Group by key, node (or cloud upstream) or model."),
    as_json: bool = JSON_OUT,
    as_csv: bool = typer.Option(False, "--csv", help="CSV on stdout, the last row the total."),
) -> None:
    """Requests, tokens, latency and cost from the usage ledger, per key, node or model,
    with the total."""
    if by not in ("key", "node", "model"):
        raise _fail(f"bad --by {by!r}: use key, node or model", 2)
    group: UsageGroup = "key" if by == "key" else "node" if by == "node" else "model"
    try:
        start = parse_since(since, time.time()) if since else None
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    with _store(state_dir) as (_, store):
        totals = store.usage_totals(group, start)
        names = {k.key_id: k.name for k in store.list_keys()} if group == "key" else {}
    rows = [{by: t.group, **({"name": names.get(t.group, "-")} if names else {}),
             **{k: v for k, v in asdict(t).items() if k != "group"}} for t in totals]
    total = _usage_total(totals)
    if as_json:
        typer.echo(json.dumps({"by": by, "since": iso(start) if start is not None else None,
                               "groups": rows, "total": total}, indent=2))
    elif as_csv:
        header = [by, *(["name"] if names else []), "requests", "ok", "prompt_tokens",
                  "completion_tokens", "avg_latency_ms", "cost"]
        writer = csv.DictWriter(sys.stdout, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow({by: "TOTAL", **({"name": ""} if names else {}), **total})
    else:
        _table([by.upper(), "REQUESTS", "OK", "PROMPT", "COMPLETION", "AVG MS", "COST"], [
            *([t.group + (f" ({names[t.group]})" if t.group in names else ""), str(t.requests),
               str(t.ok), str(t.prompt_tokens), str(t.completion_tokens),
               f"{t.avg_latency_ms:.0f}", f"{t.cost:.4f}"] for t in totals),
            ["TOTAL", str(total["requests"]), str(total["ok"]), str(total["prompt_tokens"]),
             str(total["completion_tokens"]), f"{total['avg_latency_ms']:.0f}",
             f"{total['cost']:.4f}"],
        ])


if __name__ == "__main__":
    app()
