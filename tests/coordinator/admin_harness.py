"""A real coordinator app with the admin API mounted (the server's own wiring:
`server._context` and `admin_api.admin_context`) on a real uvicorn, a real
SQLite store in a real state dir, and a real tunnel endpoint for nodes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from coordinator.admin_api import AdminContext, admin_context, mount_admin
from coordinator.api import ApiContext, build_app
from coordinator.config import CoordinatorConfig
from coordinator.dispatch import Dispatcher
from coordinator.gateway import Gateway
from coordinator.ledger_journal import JOURNAL_DIR, open_journal
from coordinator.registry import Registry
from coordinator.server import _context
from coordinator.state import StateDir
from coordinator.store import Store
from coordinator.traffic import Traffic
from tests.coordinator.coordinator_harness import served
from tunnel import FrameType, Identity, Link, Mux, connect
from tunnel import serve as serve_tunnel


@dataclass
class Admined:
    url: str
    state: StateDir
    store: Store
    api: ApiContext
    admin: AdminContext
    http: httpx.AsyncClient
    admin_key: str
    tunnel_url: str
    links: list[tuple[Link, asyncio.Task[None]]] = field(default_factory=list)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.http.request(method, "/admin/v1" + path, headers=self.auth, **kwargs)

    async def node(self, models: list[Any], telemetry: dict[str, Any] | None = None) -> str:
        """Enroll and connect a node with this inventory; returns its did once registered."""
        identity = Identity.generate()
        token_id, secret = self.store.create_token(60, {"site": "lab"}, time.time())
        self.store.redeem_token(token_id, secret, identity.did, time.time())
        link = await connect(self.tunnel_url, identity, self.state.static_public())
        mux = Mux(link, initiator=True)
        self.links.append((link, asyncio.create_task(mux.run())))
        await mux.send_control(FrameType.INVENTORY, {"models": models})
        await mux.send_control(FrameType.TELEMETRY, telemetry or {})
        deadline = time.monotonic() + 10
        registry = self.admin.registry
        while (conn := registry.get(identity.did)) is None or not conn.telemetry:
            assert time.monotonic() < deadline, "node never registered"
            await asyncio.sleep(0.01)
        return identity.did


@contextlib.asynccontextmanager
async def admined(tmp_path: Path) -> AsyncIterator[Admined]:
    state = StateDir(tmp_path / "coordinator")
    store = Store(state.db_url)
    registry = Registry()
    config = CoordinatorConfig()
    traffic = Traffic()
    api = _context(store, registry, config, Dispatcher(registry, config.dispatch),
                   traffic=traffic, journal=open_journal(state.path / JOURNAL_DIR))
    gateway = Gateway(store, registry)
    tunnel = await serve_tunnel("127.0.0.1", 0, state.static_key(), gateway.authorize,
                                gateway.on_link)
    tunnel_url = f"ws://127.0.0.1:{next(iter(tunnel.sockets)).getsockname()[1]}"
    admin = admin_context(store, state, registry, api, gateway=gateway, tunnel_url=tunnel_url,
                          traffic=traffic)
    app = build_app(api)
    mount_admin(app, admin)
    admin_key = (state.path / "admin.key").read_text().strip()
    harness: Admined | None = None
    try:
        async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
            harness = Admined(url, state, store, api, admin, http, admin_key, tunnel_url)
            yield harness
    finally:
        for link, task in harness.links if harness else []:
            await link.close()
            with contextlib.suppress(Exception):
                await task
        tunnel.close()
        await tunnel.wait_closed()
        await asyncio.to_thread(api.close)
        store.close()
