"""One replica of a cluster: its membership, the events it shares, the shared state it uses.

Started by `serve` when a Redis URL is given (coordinator/CLUSTER.md has the design):

- membership: this replica's heartbeat in the store's members table every
  `members.HEARTBEAT_S`; the live member list (their tunnel URLs, at most
  `MAX_MEMBERS`) goes to each node in the handshake's accept map and, whenever it
  changes, in a `{"op": "members"}` COMMAND frame down every tunnel, so each node keeps
  one tunnel per replica;
- events on one Redis pub/sub channel: `keys` (an API key was revoked or rotated: drop
  the verified-key cache), `nodes` (a node was revoked: close its tunnel here too),
  `spend` (a cost just recorded: count it toward the key's budget now). After the
  subscription is (re)made every replica resyncs as if `keys` and `nodes` had arrived,
  so an event lost while Redis was down is not a revoke lost: the store stays the truth;
- the shared buckets and cache (`shared_state.py`), and budgets whose spend is pushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from coordinator import members as members_table
from coordinator.engines import redis_module, resolve_engines
from coordinator.live import LIVE_FILE, live_view, read_live
from coordinator.members import MAX_MEMBERS, Member
from coordinator.metering import BudgetTracker, SpendQuery
from coordinator.registry import Registry
from coordinator.shared_state import PREFIX, RedisLink
from coordinator.store import Store
from tunnel import FrameType, Hello, TunnelError

Authorize = Callable[[Hello, str], Awaitable[dict[str, Any]]]

log = logging.getLogger(__name__)

T = TypeVar("T")
CHANNEL = f"{PREFIX}events"
LIVE_TTL_S = 10
RESUBSCRIBE_S = 1.0


class SharedBudgets(BudgetTracker):
    """A `BudgetTracker` that tells every replica of each cost it counts (`spend` events)."""

    def __init__(self, spend: SpendQuery, publish: Callable[[str, float], None]) -> None:
        super().__init__(spend)
        self._publish = publish

    def add(self, key_id: str | None, cost: float) -> None:
        super().add(key_id, cost)
        if key_id is not None and cost > 0:
            self._publish(key_id, cost)

    def add_remote(self, key_id: str, cost: float) -> None:
        super().add(key_id, cost)


class Cluster:
    def __init__(self, store: Store, link: RedisLink, registry: Registry) -> None:
        self.store = store
        self.link = link
        self.registry = registry
        self.me = Member("", "", "", time.time(), time.time())
        self.member_urls: list[str] = []
        self.forget_keys: Callable[[], None] = lambda: None
        self.close_revoked: Callable[[], Awaitable[Any]] | None = None
        self.budgets: SharedBudgets | None = None
        self.events_seen = 0
        self.event = asyncio.Event()
        """set after each event from the channel is handled (tests wait on it)"""

    async def join(self, tunnel_url: str, api_url: str) -> None:
        """Become a member (id: the advertised tunnel URL), in the table already if the
        database answers (else the membership loop logs and retries)."""
        self.me = Member(tunnel_url, tunnel_url, api_url, time.time(), time.time())
        self.member_urls = [tunnel_url]
        self.store.handshake_scope = tunnel_url
        await asyncio.to_thread(members_table.create_tables, self.store.engine)
        with contextlib.suppress(SQLAlchemyError):
            await self.heartbeat_once()

    def authorizer(self, authorize: Authorize) -> Authorize:
        """The tunnel's authorize hook, with the live member list in every accept map."""

        async def with_members(hello: Hello, remote: str) -> dict[str, Any]:
            return {**await authorize(hello, remote), **self.accept_extra()}

        return with_members

    def start(self, forget_keys: Callable[[], None],
              close_revoked: Callable[[], Awaitable[Any]]) -> list[asyncio.Task[None]]:
        """The replica's loops: heartbeat, events, live view (cancel them to stop)."""
        self.forget_keys = forget_keys
        self.close_revoked = close_revoked
        return [asyncio.create_task(self.membership(), name="members"),
                asyncio.create_task(self.events(), name="cluster-events"),
                asyncio.create_task(self.share_live(), name="cluster-live")]

    async def stop(self) -> None:
        await self.leave()
        self.link.close()

    # -- membership

    def accept_extra(self) -> dict[str, Any]:
        """What the accept map of every node's handshake carries."""
        return {"members": list(self.member_urls)}

    async def heartbeat_once(self) -> None:
        now = time.time()
        me = Member(self.me.member_id, self.me.tunnel_url, self.me.api_url,
                    self.me.started_at, now)
        await asyncio.to_thread(members_table.heartbeat, self.store.engine, me)
        live = await asyncio.to_thread(members_table.live_members, self.store.engine, now)
        urls = [m.tunnel_url for m in live][:MAX_MEMBERS]
        if self.me.tunnel_url not in urls:
            urls = [self.me.tunnel_url, *urls][:MAX_MEMBERS]
        if urls != self.member_urls:
            log.info("cluster members now %s", urls)
            self.member_urls = urls
            await self.push_members()

    async def push_members(self) -> None:
        body = {"op": "members", "members": list(self.member_urls)}
        for conn in self.registry.nodes():
            with contextlib.suppress(TunnelError, OSError):
                await conn.mux.send_control(FrameType.COMMAND, body)

    async def membership(self, period: float = members_table.HEARTBEAT_S) -> None:
        failing = False
        while True:
            try:
                await self.heartbeat_once()
                if failing:
                    log.warning("cluster heartbeat is written again")
                failing = False
            except SQLAlchemyError as exc:
                if not failing:
                    log.error("cluster heartbeat failed (database down?): %s; the member "
                              "list stays as it was", str(exc).splitlines()[0][:200])
                failing = True
            await asyncio.sleep(period)

    async def leave(self) -> None:
        with contextlib.suppress(SQLAlchemyError):
            await asyncio.to_thread(members_table.leave, self.store.engine, self.me.member_id)

    # -- events

    def announcing(
        self, forget_keys: Callable[[], None], close_revoked: Callable[[], Awaitable[T]]
    ) -> tuple[Callable[[], None], Callable[[], Awaitable[T]]]:
        """The admin API's revoke hooks, which also tell every other replica."""

        def keys() -> None:
            forget_keys()
            self.publish("keys")

        async def nodes() -> T:
            result = await close_revoked()
            self.publish("nodes")
            return result

        return keys, nodes

    def publish(self, kind: str, **fields: Any) -> None:
        message = json.dumps({"type": kind, "from": self.me.member_id, **fields})
        self.link.call(f"a {kind} event", lambda r: r.publish(CHANNEL, message), lambda: 0)

    def publish_spend(self, key_id: str, cost: float) -> None:
        self.publish("spend", key=key_id, cost=cost)

    async def on_event(self, raw: bytes | str) -> None:
        try:
            event = json.loads(raw)
            kind = event["type"]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable cluster event ignored: %.200r", raw)
            return
        self.events_seen += 1
        if event.get("from") == self.me.member_id:
            return
        if kind == "keys":
            self.forget_keys()
        elif kind == "nodes" and self.close_revoked is not None:
            await self.close_revoked()
        elif kind == "spend" and self.budgets is not None:
            cost = event.get("cost")
            if isinstance(event.get("key"), str) and isinstance(cost, int | float):
                self.budgets.add_remote(event["key"], float(cost))
        self.event.set()

    async def resync(self) -> None:
        """After (re)subscribing: act as if every revocation event had arrived."""
        self.forget_keys()
        if self.close_revoked is not None:
            await self.close_revoked()

    async def events(self) -> None:
        """Until cancelled: listen on the channel; resubscribe (and resync) after an outage."""
        aioredis = redis_module().asyncio
        down = False
        while True:
            client = aioredis.Redis.from_url(self.link.url)
            try:
                pubsub = client.pubsub()
                await pubsub.subscribe(CHANNEL)
                if down:
                    log.warning("cluster events: subscribed again; resyncing revocations")
                down = False
                await self.resync()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await self.on_event(message["data"])
            except (redis_module().RedisError, OSError) as exc:
                if not down:
                    log.error("cluster events: lost the Redis subscription (%s); revocations "
                              "now reach this replica by the store's own checks", exc)
                down = True
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(RESUBSCRIBE_S)

    # -- the live view every replica sees

    async def share_live(self, period: float = 2.0) -> None:
        key = f"{PREFIX}live:{self.me.member_id}"
        while True:
            view = live_view(self.registry, time.time())
            view["member"] = self.me.member_id
            view["pid"] = os.getpid()
            self.link.call("the live view", functools.partial(
                _set, key=key, value=json.dumps(view, separators=(",", ":"))), lambda: None)
            await asyncio.sleep(period)


def merge_live(views: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """did -> one summary from every replica's live view: the freshest telemetry, requests
    in flight summed over the replicas, and which replicas the node is connected to."""
    merged: dict[str, dict[str, Any]] = {}
    for member in sorted(views):
        nodes = views[member].get("nodes")
        for did, summary in (nodes.items() if isinstance(nodes, dict) else ()):
            if not isinstance(summary, dict):
                continue
            held = merged.get(did)
            flight = summary.get("in_flight") if isinstance(summary.get("in_flight"), int) else 0
            if held is None:
                merged[did] = {**summary, "in_flight": flight, "replicas": [member]}
                continue
            held["in_flight"] += flight
            held["replicas"].append(member)
            age, held_age = summary.get("telemetry_age_s"), held.get("telemetry_age_s")
            if isinstance(age, int | float) and (held_age is None or age < held_age):
                merged[did] = {**summary, "in_flight": held["in_flight"],
                               "replicas": held["replicas"]}
    return merged


def cluster_live(state_dir: Path, now: float) -> dict[str, dict[str, Any]] | None:
    """The live view for admin commands on a replica's box: every replica's, merged, when
    the state dir names a Redis (engines.json); else (or Redis down) this server's own."""
    local = read_live(state_dir / LIVE_FILE, now)
    url = resolve_engines(state_dir).redis_url
    if url is None:
        return local
    try:
        views = read_cluster_live(url)
    except (redis_module().RedisError, OSError) as exc:
        log.warning("redis unreachable (%s): showing this replica's live view only", exc)
        return local
    return merge_live(views) if views else local


def _set(client: Any, *, key: str, value: str) -> None:
    client.set(key, value, ex=LIVE_TTL_S)


def read_cluster_live(url: str) -> dict[str, dict[str, Any]]:
    """member id -> its live view, from every replica that shared one in the last seconds."""
    client = redis_module().Redis.from_url(url, socket_timeout=2.0)
    try:
        out: dict[str, dict[str, Any]] = {}
        for key in client.scan_iter(match=f"{PREFIX}live:*"):
            raw: Any = client.get(key)
            if raw is not None:
                view = json.loads(raw)
                out[str(view.get("member"))] = view
        return out
    finally:
        client.close()
