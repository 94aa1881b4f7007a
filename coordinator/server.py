"""`meshgate-coordinator serve`: the public API and the tunnel endpoint in one process.

Start-up, loop, graceful shutdown (uvicorn's lifecycle): uvicorn owns the
signals; when it returns, the tunnel endpoint closes its links and the store
is disposed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from coordinator import write_tick
from coordinator.admin_api import admin_context, mount_admin, watch_key_changes
from coordinator.api import ApiContext, build_app
from coordinator.cache import ResponseCache
from coordinator.cloud import CloudClient
from coordinator.cluster import Cluster, SharedBudgets
from coordinator.config import CoordinatorConfig, resolve_config
from coordinator.dispatch import Dispatcher
from coordinator.engines import Engines, write_engines
from coordinator.gateway import Gateway
from coordinator.gcpolicy import gc_loop
from coordinator.ingest import node_streams
from coordinator.ledger_journal import JOURNAL_DIR, LedgerJournal, Marks, open_journal, recover
from coordinator.ledger_writer import linger_from_env
from coordinator.limits import KeyGate, RateLimiter
from coordinator.live import LIVE_FILE, write_live_loop
from coordinator.metering import BudgetTracker
from coordinator.metrics import Metrics
from coordinator.registry import Registry
from coordinator.relay import relay
from coordinator.shared_state import RedisBuckets, RedisLink, SharedResponseCache
from coordinator.spool import LedgerSpool, answering_database_outages
from coordinator.state import ServeOptions, StateDir
from coordinator.store import Store, UsageRecord
from coordinator.traffic import Traffic
from meshgate.httpserver import COORDINATOR_LIMITS, from_env, server_config
from meshgate.logs import set_access_log, setup_logging
from meshgate.serving import DaemonServer, run
from meshgate.startup import StartupError, check_port
from tunnel import serve as serve_tunnel

log = logging.getLogger(__name__)


def _context(store: Store, registry: Registry, config: CoordinatorConfig,
             dispatcher: Dispatcher, opts: ServeOptions | None = None, *,
             cluster: Cluster | None = None, spool: LedgerSpool | None = None,
             traffic: Traffic | None = None,
             known: Callable[[], set[str]] | None = None,
             journal: LedgerJournal | None = None) -> ApiContext:
    if cluster is None:  # one coordinator: limits, budgets and cache in this process
        gate = KeyGate(budgets=BudgetTracker(store.spend_by_key))
    else:  # a replica: the same objects on Redis (cluster.py, shared_state.py)
        cluster.budgets = SharedBudgets(store.spend_by_key, cluster.publish_spend)
        gate = KeyGate(RateLimiter(buckets=RedisBuckets(cluster.link)), cluster.budgets)

    def verify_key(plaintext: str) -> str | None:
        record = store.verify_key(plaintext)
        if record is None:
            return None
        gate.remember(record.key_id, record.scope)  # scopes and budgets, fresh at every verify
        return record.key_id

    def known_models() -> set[str]:  # the gateway's cached view, when there is a gateway
        return store.served_models() | set(registry.models())

    def record_usage(row: dict[str, Any]) -> None:
        record_usages([row])

    def record_usages(rows: list[dict[str, Any]]) -> None:  # one transaction (ledger_writer.py)
        now = time.time()
        (spool.record_many if spool else store.record_usages)(
            [UsageRecord(**row, created_at=now) for row in rows])
        _traffic(rows)

    def record_journaled(rows: list[dict[str, Any]], marks: Marks) -> None:  # with the mark
        if spool is not None:
            spool.record_many([UsageRecord(**row) for row in rows], marks)
        else:
            store.record_rows(rows, marks)
        _traffic(rows)

    def record_now(rows: list[dict[str, Any]]) -> bool:  # SQLite, nobody else writing
        stored = store.record_rows_now(rows, time.time())
        if stored and traffic is not None:  # counted after the answer left, as the metrics
            asyncio.get_running_loop().call_soon(_traffic, rows)
        return stored

    def _traffic(rows: list[dict[str, Any]]) -> None:
        if traffic is not None:
            for row in rows:
                traffic.add(row)  # the web pane's and `top`'s last hour

    cache: ResponseCache | None = None
    if opts is not None and opts.cache:
        cache = (ResponseCache(ttl_s=opts.cache_ttl_s, max_entries=opts.cache_entries)
                 if cluster is None else SharedResponseCache(
                     cluster.link, ttl_s=opts.cache_ttl_s, max_entries=opts.cache_entries))
    metrics = Metrics()
    dispatcher.on_decision = metrics.schedule.observe
    ctx = ApiContext(registry, verify_key, known or known_models, record_usage,
                     record_usages=record_usages, config=config,
                     record_now=record_now if spool is None else None,
                     ledger_housekeeping=store.ledger_checkpoint,
                     journal=journal, record_journaled=record_journaled,
                     ledger_linger_s=ledger_linger(),
                     dispatcher=dispatcher, gate=gate, metrics=metrics, cache=cache)
    store.ledger_barrier = ctx.flush_ledger  # this process reads what it journaled
    return ctx


async def serve(opts: ServeOptions, config: CoordinatorConfig | None = None) -> None:
    config = config if config is not None else resolve_config(opts.config)
    state = StateDir(opts.state_dir, db_url=opts.database_url)
    write_engines(state.path, Engines(  # for the admin commands on this box
        opts.database_url, opts.redis_url,
        str(opts.static_key_file.resolve()) if opts.static_key_file else None))
    store = Store(state.db_url)
    clouds = {u.name: CloudClient(u) for u in config.upstreams}
    registry = Registry(c.view() for c in clouds.values())
    dispatcher = Dispatcher(registry, config.dispatch, clouds)
    if config.path is not None:
        log.info("config %s: %d upstream(s) %s, %d alias(es), %d task route(s)", config.path,
                 len(clouds), sorted(clouds), len(config.aliases), len(config.tasks))
    gateway = Gateway(store, registry)
    cluster = Cluster(store, RedisLink(opts.redis_url), registry) if opts.redis_url else None
    static_key = state.static_key(opts.static_key_file)
    tunnel_server = await serve_tunnel(
        opts.tunnel_host, opts.tunnel_port, static_key,
        cluster.authorizer(gateway.authorize) if cluster else gateway.authorize, gateway.on_link,
        known=gateway.is_known,
    )
    tunnel_port = next(iter(tunnel_server.sockets)).getsockname()[1]
    advertised_host = "127.0.0.1" if opts.tunnel_host in ("0.0.0.0", "::", "") else opts.tunnel_host  # noqa: S104
    tunnel_url = opts.advertise_url or f"ws://{advertised_host}:{tunnel_port}"
    api_host = "127.0.0.1" if opts.api_host in ("0.0.0.0", "::", "") else opts.api_host  # noqa: S104
    state.write_advertise(tunnel_url=tunnel_url, api_url=f"http://{api_host}:{opts.api_port}")
    log.info("tunnel endpoint on %s (advertised as %s)", tunnel_port, tunnel_url)
    if cluster is not None:
        await cluster.join(tunnel_url, f"http://{api_host}:{opts.api_port}")
    spool = LedgerSpool(store, state.path) if store.engine.dialect.name != "sqlite" else None
    journal = await asyncio.to_thread(_ledger_journal, state.path / JOURNAL_DIR, store, spool)
    traffic = Traffic()
    ctx = _context(store, registry, config, dispatcher, opts, cluster=cluster, spool=spool,
                   traffic=traffic, known=gateway.known_models, journal=journal)
    # apps on nodes asking for others' models; nodes uploading what they served offline
    gateway.on_request = node_streams(store, ctx.metrics, functools.partial(relay, ctx))
    app = answering_database_outages(build_app(ctx))  # a 503, not a bare 500
    admin = admin_context(store, state, registry, ctx, gateway=gateway, static_key=static_key,
                          tunnel_url=tunnel_url, traffic=traffic)
    if cluster is not None:  # a revoke here reaches every replica at once (pub/sub)
        admin.forget_keys, admin.close_revoked = cluster.announcing(
            admin.forget_keys, admin.close_revoked)
    mount_admin(app, admin)
    uv_config = server_config(  # bounded: timeouts, connection cap (meshgate/httpserver.py)
        app,
        COORDINATOR_LIMITS,
        host=opts.api_host,
        port=opts.api_port,
        log_level=opts.log_level.lower(),
        access_log=False,
        lifespan="off",
        log_config=None,  # ours (meshgate/logs.py), in either format
    )
    server = DaemonServer(uv_config)
    admin.stopping = lambda: server.should_exit  # the pane's live streams end with the server
    background = [
        asyncio.create_task(gateway.watch_revocations(), name="revocations"),
        asyncio.create_task(gateway.flush_seen_loop(), name="last-seen"),
        asyncio.create_task(gc_loop(), name="gc"),  # a fleet-sized heap (gcpolicy.py)
        asyncio.create_task(write_live_loop(state.path / LIVE_FILE, registry), name="live"),
        asyncio.create_task(watch_key_changes(store, ctx.forget_keys), name="key-changes"),
        *([asyncio.create_task(spool.run(), name="ledger-spool")] if spool else []),
    ]
    if cluster is not None:
        background += cluster.start(ctx.forget_keys, gateway.close_revoked)
    try:
        await server.serve()
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if cluster is not None:
            await cluster.stop()  # leaves the members table: nodes drop this replica at once
        tunnel_server.close()
        await tunnel_server.wait_closed()
        await _close(ctx, clouds.values(), store)
        log.info("coordinator stopped")


async def _close(ctx: ApiContext, clouds: Iterable[CloudClient], store: Store) -> None:
    for cloud in clouds:
        await cloud.aclose()
    await asyncio.to_thread(ctx.close)  # the ledger rows still queued, then its thread
    store.close()


def _ledger_journal(directory: Path, store: Store,
                   spool: LedgerSpool | None) -> LedgerJournal | None:
    """Replay what earlier runs journaled and did not commit, then open this run's journal
    (None when it cannot be written: rows are then committed before their answers)."""
    spooled = spool.marks() if spool is not None else {}

    def mark(jid: str) -> int:
        return max(store.journal_mark(jid), spooled.get(jid, 0))

    def store_rows(rows: list[dict[str, Any]], marks: Marks) -> None:
        if spool is not None:
            spool.record_many([UsageRecord(**row) for row in rows], marks)
        else:
            store.record_rows(rows, marks)

    recover(directory, mark=mark, store=store_rows, forget=store.forget_journal_mark)
    return open_journal(directory)


def pace_writes(config: CoordinatorConfig) -> None:
    """Set the process's write pacing from `[stream]` (coordinator/write_tick.py); a bad
    ``MESHGATE_COORDINATOR_LAG_MS`` (the tests' hook) is a StartupError."""
    stream = config.stream
    try:
        write_tick.configure(stream.tick_ms / 1000, stream.tick_engage_ms / 1000,
                             stream.tick_streams, write_tick.fixed_lag(os.environ))
    except ValueError as exc:
        raise StartupError(str(exc)) from None


def ledger_linger() -> float:
    """The ledger writer's linger (``MESHGATE_LEDGER_LINGER_MS``, ledger_writer.py) in
    seconds; a bad value is a StartupError, as a bad lag hook is (`pace_writes`)."""
    try:
        return linger_from_env(os.environ)
    except ValueError as exc:
        raise StartupError(str(exc)) from None


def run_server(opts: ServeOptions, config: CoordinatorConfig | None = None) -> None:
    if config is None:
        config = resolve_config(opts.config)  # a bad file fails here, before anything listens
    setup_logging(opts.log_format, opts.log_level)
    pace_writes(config)
    ledger_linger()  # read again by `_context`: a bad value stops the start here
    from_env(COORDINATOR_LIMITS)  # MESHGATE_HTTP_*, read again by `server_config`: likewise
    set_access_log(config.access_log if opts.access_log is None else opts.access_log)
    check_port(opts.api_host, opts.api_port, what="API", option="--api-port")
    check_port(opts.tunnel_host, opts.tunnel_port, what="tunnel endpoint", option="--tunnel-port")
    run(serve(opts, config), loop="uvloop")  # MESHGATE_LOOP=asyncio: asyncio's (serving.py)
