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
import time
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from coordinator.api import ApiContext, build_app
from coordinator.cache import ResponseCache
from coordinator.cloud import CloudClient
from coordinator.config import CoordinatorConfig, resolve_config
from coordinator.dispatch import Dispatcher
from coordinator.engines import Engines, write_engines
from coordinator.gateway import Gateway
from coordinator.limits import KeyGate
from coordinator.live import LIVE_FILE, write_live_loop
from coordinator.logs import setup_json_logging
from coordinator.metering import BudgetTracker
from coordinator.metrics import Metrics
from coordinator.registry import Registry
from coordinator.relay import relay
from coordinator.state import ServeOptions, StateDir
from coordinator.store import Store, UsageRecord
from meshgate.serving import DaemonServer
from tunnel import serve as serve_tunnel

log = logging.getLogger(__name__)


def _context(store: Store, registry: Registry, config: CoordinatorConfig,
             dispatcher: Dispatcher, opts: ServeOptions | None = None) -> ApiContext:
    gate = KeyGate(budgets=BudgetTracker(store.spend_by_key))

    def verify_key(plaintext: str) -> str | None:
        record = store.verify_key(plaintext)
        if record is None:
            return None
        gate.remember(record.key_id, record.scope)  # scopes and budgets, fresh at every verify
        return record.key_id

    def known_models() -> set[str]:
        return {m for node in store.list_nodes() if node.revoked_at is None for m in node.models}

    def record_usage(row: dict[str, Any]) -> None:
        store.record_usage(UsageRecord(**row, created_at=time.time()))

    cache = (ResponseCache(ttl_s=opts.cache_ttl_s, max_entries=opts.cache_entries)
             if opts is not None and opts.cache else None)
    return ApiContext(registry, verify_key, known_models, record_usage, config=config,
                      dispatcher=dispatcher, gate=gate, metrics=Metrics(), cache=cache)


async def serve(opts: ServeOptions, config: CoordinatorConfig | None = None) -> None:
    config = config if config is not None else resolve_config(opts.config)
    state = StateDir(opts.state_dir, db_url=opts.database_url)
    write_engines(state.path, Engines(opts.database_url, opts.redis_url))  # for the admin CLI
    store = Store(state.db_url)
    clouds = {u.name: CloudClient(u) for u in config.upstreams}
    registry = Registry(c.view() for c in clouds.values())
    dispatcher = Dispatcher(registry, config.dispatch, clouds)
    if config.path is not None:
        log.info("config %s: %d upstream(s) %s, %d alias(es), %d task route(s)", config.path,
                 len(clouds), sorted(clouds), len(config.aliases), len(config.tasks))
    gateway = Gateway(store, registry)
    await asyncio.to_thread(gateway.load_known)  # they may handshake past an address's limit
    tunnel_server = await serve_tunnel(
        opts.tunnel_host, opts.tunnel_port, state.static_key(opts.static_key_file),
        gateway.authorize, gateway.on_link, known=gateway.is_known,
    )
    tunnel_port = next(iter(tunnel_server.sockets)).getsockname()[1]
    advertised_host = "127.0.0.1" if opts.tunnel_host in ("0.0.0.0", "::", "") else opts.tunnel_host  # noqa: S104
    tunnel_url = opts.advertise_url or f"ws://{advertised_host}:{tunnel_port}"
    api_host = "127.0.0.1" if opts.api_host in ("0.0.0.0", "::", "") else opts.api_host  # noqa: S104
    state.write_advertise(tunnel_url=tunnel_url, api_url=f"http://{api_host}:{opts.api_port}")
    log.info("tunnel endpoint on %s (advertised as %s)", tunnel_port, tunnel_url)
    ctx = _context(store, registry, config, dispatcher, opts)
    gateway.on_request = functools.partial(relay, ctx)  # apps on nodes asking for others' models
    uv_config = uvicorn.Config(
        build_app(ctx),
        host=opts.api_host,
        port=opts.api_port,
        log_level=opts.log_level.lower(),
        access_log=False,
        lifespan="off",
        log_config=None if opts.log_format == "json" else LOGGING_CONFIG,  # JSON: ours
    )
    server = DaemonServer(uv_config)
    background = [
        asyncio.create_task(gateway.watch_revocations(), name="revocations"),
        asyncio.create_task(write_live_loop(state.path / LIVE_FILE, registry), name="live"),
    ]
    try:
        await server.serve()
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        tunnel_server.close()
        await tunnel_server.wait_closed()
        for cloud in clouds.values():
            await cloud.aclose()
        store.close()
        log.info("coordinator stopped")


def run_server(opts: ServeOptions, config: CoordinatorConfig | None = None) -> None:
    if config is None:
        config = resolve_config(opts.config)  # a bad file fails here, before anything listens
    if opts.log_format == "json":
        setup_json_logging(opts.log_level)
    else:
        logging.basicConfig(
            level=opts.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    asyncio.run(serve(opts, config))
