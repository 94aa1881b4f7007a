"""The admin API: `/admin/v1/...` on the coordinator's public port, behind an admin key.

    GET    /admin/v1/tokens                 every enrollment token (never a secret)
    POST   /admin/v1/tokens                 {"ttl": "1h" | seconds, "uses": 1, "labels": {}}
    GET    /admin/v1/tokens/{id}/uses       each enrollment the token paid for
    DELETE /admin/v1/tokens/{id}            refuse its remaining uses
    GET    /admin/v1/keys                   every API key with its scopes
    POST   /admin/v1/keys                   {"name": ..., "models": [...], "rpm": ..., ...}
    DELETE /admin/v1/keys/{id or name}      revoke: refused from the next request on
    POST   /admin/v1/keys/{id or name}/rotate
    GET    /admin/v1/nodes                  enrolled nodes, with the live view of connected ones
    DELETE /admin/v1/nodes/{did}            revoke: its tunnel is closed at once
    GET    /admin/v1/usage?by=model&since=  the ledger summed per key, node or model
    GET    /admin/v1/live                   fleet, traffic and live requests (for `top`, `/ui`)

`Authorization: Bearer mga_...` (an admin key, `admin_keys.py`) or the web
pane's session cookie. Errors have OpenAI's shape like every other route.
A revoke or rotate here empties the API's key cache before it answers, so
the old key is refused by the very next request; the server also watches
the store's key generation (`watch_key_changes`) for changes made by the
CLI on the database directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import APIRouter, FastAPI, Request

from coordinator.admin_keys import ADMIN_PREFIX, AdminKeys, ensure_admin_key
from coordinator.admin_ops import AdminOps, BadField
from coordinator.api_context import ApiContext
from coordinator.errors import CoordinatorError, KeyNameTaken, UnknownKey, UnknownNode, UnknownToken
from coordinator.fleet_view import fleet, models_across
from coordinator.gateway import Gateway
from coordinator.hot_routes import CoordinatorApp
from coordinator.live import node_summary
from coordinator.live_requests import LiveRequests, LiveRequestsMiddleware
from coordinator.registry import Registry
from coordinator.request_io import read_body
from coordinator.state import StateDir
from coordinator.store import KEY_PREFIX, KEYS_GENERATION, Store
from coordinator.traffic import Traffic
from coordinator.ui.sessions import SESSION_COOKIE, Sessions
from meshgate.openai import OpenAIError
from meshgate.outage import OutageLog

log = logging.getLogger(__name__)

KEY_WATCH_S = 0.25
MAX_ADMIN_BODY = 64 * 1024
T = TypeVar("T")


@dataclass
class AdminContext:
    """What the admin API and the web pane need from the running coordinator."""

    ops: AdminOps
    keys: AdminKeys
    registry: Registry
    forget_keys: Callable[[], None]
    """drop the API's cache of verified app keys (after a revoke or rotate)."""
    close_revoked: Callable[[], Awaitable[list[str]]]
    """close the tunnels of revoked nodes now."""
    sessions: Sessions
    """the web pane's sign-ins (in the store: every replica sees them)."""
    traffic: Traffic = field(default_factory=Traffic)
    requests: LiveRequests = field(default_factory=LiveRequests)
    stopping: Callable[[], bool] = lambda: False
    """true once the server is shutting down: the pane's event streams end."""

    async def admin(self, request: Request) -> str:
        """The admin key id behind this request, or 401."""
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            key_id = await asyncio.to_thread(self.sessions.get, session)
            if key_id is not None and await self.key_live(key_id):
                return key_id
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise OpenAIError(401, "the admin API needs an admin key: send "
                              "'Authorization: Bearer mga_...'", code="invalid_api_key",
                              hop="coordinator")
        if key.startswith(KEY_PREFIX) and not key.startswith(ADMIN_PREFIX):
            raise OpenAIError(401, "this is an app's API key; the admin API takes an admin key "
                              "(mga_..., see 'meshgate-coordinator admin-key')",
                              code="invalid_api_key", hop="coordinator")
        record = await asyncio.to_thread(self.keys.verify, key)
        if record is None:
            raise OpenAIError(401, "invalid admin key", code="invalid_api_key", hop="coordinator")
        return record.key_id

    async def key_live(self, key_id: str) -> bool:
        return await asyncio.to_thread(self.keys.is_live, key_id)


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking admin operation in a thread; its errors in OpenAI's shape."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except (UnknownKey, UnknownNode, UnknownToken) as exc:
        raise OpenAIError(404, str(exc), code="not_found", hop="coordinator") from None
    except KeyNameTaken as exc:
        raise OpenAIError(409, str(exc), code="conflict", param="name",
                          hop="coordinator") from None
    except BadField as exc:
        raise OpenAIError(400, str(exc), param=exc.param, hop="coordinator") from None
    except CoordinatorError as exc:
        raise OpenAIError(400, str(exc), hop="coordinator") from None


async def json_body(request: Request) -> dict[str, Any]:
    raw = await read_body(request, MAX_ADMIN_BODY)  # refused past the cap, not read whole
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise OpenAIError(400, f"body is not JSON: {exc}", hop="coordinator") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "body must be a JSON object", hop="coordinator")
    return body


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is not None and ((isinstance(value, bool) and kind is not bool)
                              or not isinstance(value, kind)):
        raise OpenAIError(400, f"{name} has the wrong type ({type(value).__name__})",
                          param=name, hop="coordinator")
    return value


def ttl_seconds(value: Any) -> int:
    from coordinator.cli_common import parse_duration

    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise OpenAIError(400, "ttl must be positive", param="ttl", hop="coordinator")
        return value
    try:
        return parse_duration(str(value))
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param="ttl", hop="coordinator") from None


def since_of(value: str | None) -> float | None:
    from coordinator.cli_common import parse_since

    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return parse_since(value, time.time())
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param="since", hop="coordinator") from None


def admin_router(ctx: AdminContext) -> APIRouter:
    router = APIRouter(prefix="/admin/v1")
    ops = ctx.ops

    @router.get("/tokens")
    async def tokens(request: Request) -> dict[str, Any]:
        await ctx.admin(request)
        return {"data": await call(ops.list_tokens)}

    @router.post("/tokens")
    async def token_create(request: Request) -> dict[str, Any]:
        await ctx.admin(request)
        body = await json_body(request)
        labels = _field(body, "labels", dict, {}) or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise OpenAIError(400, "labels must map strings to strings", param="labels",
                              hop="coordinator")
        uses = _field(body, "uses", int, 1)
        return await call(ops.create_token, ttl_s=ttl_seconds(body.get("ttl", "1h")),
                          uses=uses, labels=labels,
                          tunnel_url=_field(body, "tunnel_url", str, None))

    @router.get("/tokens/{token_id}/uses")
    async def token_uses(request: Request, token_id: str) -> dict[str, Any]:
        await ctx.admin(request)
        return {"data": await call(ops.token_uses, token_id)}

    @router.delete("/tokens/{token_id}")
    async def token_revoke(request: Request, token_id: str) -> dict[str, Any]:
        await ctx.admin(request)
        return await call(ops.revoke_token, token_id)

    @router.get("/keys")
    async def keys(request: Request) -> dict[str, Any]:
        await ctx.admin(request)
        return {"data": await call(ops.list_keys)}

    @router.post("/keys")
    async def key_create(request: Request) -> dict[str, Any]:
        await ctx.admin(request)
        body = await json_body(request)
        name = _field(body, "name", str, None)
        if not name:
            raise OpenAIError(400, "a key needs a name", param="name", hop="coordinator")
        scopes = {k: v for k, v in body.items() if k != "name"}
        return await call(ops.create_key, name, scopes)

    @router.delete("/keys/{key}")
    async def key_revoke(request: Request, key: str) -> dict[str, Any]:
        await ctx.admin(request)
        result = await call(ops.revoke_key, key)
        ctx.forget_keys()  # before answering: the next request with it is refused
        return result

    @router.post("/keys/{key}/rotate")
    async def key_rotate(request: Request, key: str) -> dict[str, Any]:
        await ctx.admin(request)
        result = await call(ops.rotate_key, key)
        ctx.forget_keys()
        return result

    @router.get("/nodes")
    async def nodes(request: Request) -> dict[str, Any]:
        await ctx.admin(request)
        return await call(ops.list_nodes)

    @router.delete("/nodes/{did}")
    async def node_revoke(request: Request, did: str) -> dict[str, Any]:
        await ctx.admin(request)
        result = await call(ops.revoke_node, did)
        await ctx.close_revoked()
        return result

    @router.get("/usage")
    async def usage(request: Request, by: str = "model", since: str | None = None
                    ) -> dict[str, Any]:
        await ctx.admin(request)
        return await call(ops.usage, by, since_of(since))

    @router.get("/live")
    async def live(request: Request, nodes: int = 200) -> dict[str, Any]:
        await ctx.admin(request)
        if nodes < 0:
            raise OpenAIError(400, "nodes must be 0 or more", param="nodes", hop="coordinator")
        return live_snapshot(ctx, nodes)

    return router


def live_snapshot(ctx: AdminContext, nodes: int = 200) -> dict[str, Any]:
    """The fleet (its `nodes` busiest), traffic and requests in flight, now (no I/O)."""
    now = time.time()
    return {"now": now, "node_count": len(ctx.registry.nodes()),
            "nodes": fleet(ctx.registry, now, nodes), "models": models_across(ctx.registry),
            "traffic": ctx.traffic.summary(now), "series": ctx.traffic.series(now),
            "requests": ctx.requests.snapshot(now), "recent": ctx.traffic.recent()}


async def watch_key_changes(store: Store, forget: Callable[[], None],
                            period: float = KEY_WATCH_S) -> None:
    """Until cancelled: drop the key cache when the store's key generation moves (a revoke
    or rotate by the CLI on the database, or by another replica): one primary-key read."""
    seen = await asyncio.to_thread(store.generation, KEYS_GENERATION)
    outage = OutageLog(log, "reading the key generation")
    while True:
        await asyncio.sleep(period)
        try:
            now = await asyncio.to_thread(store.generation, KEYS_GENERATION)
        except Exception as exc:  # noqa: BLE001 (logged by OutageLog; the watcher goes on)
            outage.failed(exc)
            continue
        outage.succeeded()
        if now != seen:
            seen = now
            forget()
            log.info("API keys changed in the store; verified keys forgotten")


def admin_context(store: Store, state: StateDir, registry: Registry, api: ApiContext, *,
                  gateway: Gateway, tunnel_url: str, traffic: Traffic,
                  static_key: X25519PrivateKey | None = None) -> AdminContext:
    """The running server's admin context; makes the first admin key if there is none."""
    keys = AdminKeys(store)
    written = ensure_admin_key(keys, state.path, time.time())
    if written is not None:
        log.info("admin key written to %s (mode 0600): the admin API and /ui take it", written)

    def live() -> dict[str, dict[str, Any]]:
        now = time.time()
        return {c.did: node_summary(c, now) for c in registry.nodes()}

    key = static_key if static_key is not None else state.static_key()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)  # a cluster's, if shared
    ops = AdminOps(store, lambda: public, lambda: tunnel_url, live)
    return AdminContext(ops, keys, registry, api.forget_keys, gateway.close_revoked,
                        Sessions(store), traffic=traffic)


def mount_admin(app: FastAPI, ctx: AdminContext) -> None:
    """The admin API, the web pane and the live-request tracker on the public app."""
    from coordinator.ui.routes import static_files, ui_router

    app.include_router(admin_router(ctx))
    app.include_router(ui_router(ctx))
    app.mount("/ui/static", static_files(), name="ui-static")
    app.add_middleware(LiveRequestsMiddleware, tracker=ctx.requests)
    if isinstance(app, CoordinatorApp):  # its hot routes note their own (hot_routes.py)
        app.live = ctx.requests
