"""`meshgate-coordinator`: run the coordinator, and administer it from anywhere.

`serve` runs it; `init` prepares a state directory; `admin-key` manages the
keys of the admin API. The admin commands (`token`, `key`, `node`, `nodes`,
`usage`: `cli_admin.py`) work on the database in the state directory, or on
any coordinator over its admin API with `--url`; `top` watches one live
(`cli_top.py`). Output meant for scripts is on stdout (a token or a key is
always the last line; `--json` is one document); everything for a person
goes to stderr.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from coordinator.cli_admin import register as register_admin
from coordinator.cli_common import STATE_DIR, parse_duration, table
from coordinator.cli_common import fail as _fail
from coordinator.cli_top import top
from coordinator.errors import CoordinatorError
from coordinator.state import ServeOptions, StateDir
from coordinator.store import Store, iso
from meshgate.version import version_callback

__all__ = ["app", "parse_duration"]

app = typer.Typer(
    rich_markup_mode=None,  # click's plain help: rich's panels label every flag <bool>
    help="meshgate coordinator", no_args_is_help=True, add_completion=False)


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=version_callback("meshgate-coordinator"), is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """meshgate coordinator"""
admin_key_app = typer.Typer(
    rich_markup_mode=None,  # click's plain help: rich's panels label every flag <bool>
    help="Admin keys for the admin API and the web pane.",
                            no_args_is_help=True)
app.add_typer(admin_key_app, name="admin-key")



@contextmanager
def _store(state_dir: Path) -> Iterator[tuple[StateDir, Store]]:
    """The state dir and its store (made if missing); store errors become exit code 2."""
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
    access_log: bool | None = typer.Option(
        None, "--access-log/--no-access-log", envvar="MESHGATE_ACCESS_LOG",
        help="A log line per request answered, never dropped under load (default: on, or "
        "the config's [log] access).", show_default=False,
    ),
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
    from meshgate.startup import StartupError

    try:
        run_server(ServeOptions(
            state_dir=state_dir, api_host=api_host, api_port=api_port,
            tunnel_host=tunnel_host, tunnel_port=tunnel_port, advertise_url=advertise_url,
            log_level=log_level, config=config, cache=cache, cache_ttl_s=cache_ttl_s,
            cache_entries=cache_entries, log_format=log_format, access_log=access_log,
            database_url=engines.database_url, redis_url=engines.redis_url,
            static_key_file=cluster_key or loaded.cluster.key_file,
        ), loaded)
    except StartupError as exc:
        raise _fail(str(exc), 1) from None


# ----------------------------------------------------------------------------- setup


@app.command()
def init(state_dir: Path = STATE_DIR) -> None:
    """Make a state directory: static key, database and a first admin key (admin.key, 0600).

    `serve` does the same on its first start; `init` lets the admin commands and a
    config-management tool prepare a coordinator before it runs."""
    from coordinator.admin_keys import AdminKeys, ensure_admin_key

    with _store(state_dir) as (state, store):
        state.static_key()
        written = ensure_admin_key(AdminKeys(store), state.path, time.time())
    typer.echo(f"coordinator state in {state_dir}", err=True)
    if written is not None:
        typer.echo(f"admin key written to {written} (mode 0600); the admin API and /ui "
                   "take it", err=True)


@admin_key_app.command("create")
def admin_key_create(
    name: str = typer.Option(..., "--name", help="Who holds it (one key per operator)."),
    state_dir: Path = STATE_DIR,
) -> None:
    """Make an admin key for the admin API, `--url` and /ui; it is the last line of stdout."""
    from coordinator.admin_client import existing_state
    from coordinator.admin_keys import AdminKeys

    try:
        state = existing_state(state_dir)
    except CoordinatorError as exc:
        raise _fail(str(exc), 2) from None
    with _store(state.path) as (_, store):
        record, plaintext = AdminKeys(store).create(name, time.time())
    typer.echo(f"admin key {record.key_id} ({record.name}); store it now, it cannot be shown "
               "again", err=True)
    typer.echo(plaintext)


@admin_key_app.command("list")
def admin_key_list(state_dir: Path = STATE_DIR) -> None:
    """Every admin key (never a secret)."""
    from coordinator.admin_client import existing_state
    from coordinator.admin_keys import AdminKeys

    try:
        state = existing_state(state_dir)
    except CoordinatorError as exc:
        raise _fail(str(exc), 2) from None
    with _store(state.path) as (_, store):
        keys = AdminKeys(store).list()
    table(["ADMIN KEY ID", "NAME", "STATE", "CREATED"], [
        [k.key_id, k.name, "revoked" if k.revoked_at else "active", iso(k.created_at)]
        for k in keys])


@admin_key_app.command("revoke")
def admin_key_revoke(key_id: str = typer.Argument(..., help="The admin key's id."),
                     state_dir: Path = STATE_DIR) -> None:
    """Revoke an admin key (its web pane sessions end with it)."""
    from coordinator.admin_client import existing_state
    from coordinator.admin_keys import AdminKeys

    try:
        state = existing_state(state_dir)
    except CoordinatorError as exc:
        raise _fail(str(exc), 2) from None
    with _store(state.path) as (_, store):
        changed = AdminKeys(store).revoke(key_id, time.time())
    typer.echo(f"revoked admin key {key_id}" if changed
               else f"admin key {key_id} was already revoked")


register_admin(app)
app.command("top")(top)


if __name__ == "__main__":
    app()
