"""Where nodes come in: authorizing handshakes and serving each node's link.

`authorize` runs inside the websocket upgrade, before any websocket exists:
an enrolling node proves its one-time token, an enrolled node proves nothing
more than its key (the Noise handshake already did), a revoked or unknown
node gets a 403 with the reason. `on_link` then owns the node's entry in the
registry for as long as the connection lives. `watch_revocations` closes the
tunnel of a node revoked while connected (the admin CLI writes the store; the
server notices within a second).

`last_seen` in the store is when the coordinator last heard from the node
(inventory, or telemetry at most every TOUCH_EVERY_S); a disconnect does not
move it forward, so a node that dropped stops looking connected. What was
heard is gathered in memory and written by `flush_seen` in one transaction
every FLUSH_SEEN_S (and at once when a node leaves): a fleet's telemetry
costs one store write a period, not one per node and frame. So while a node
stays connected its `last_seen` lags by up to TOUCH_EVERY_S + FLUSH_SEEN_S
(32 s); once it left, it is the last time heard to within TOUCH_EVERY_S
(whether a node is connected right now is the live view's answer, not this).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from coordinator.errors import CoordinatorError, EnrollmentRefused
from coordinator.registry import NodeConn, Registry
from coordinator.store import Store
from meshgate.bounds import clip
from meshgate.node_messages import Hello as NodeHello
from meshgate.node_messages import Inventory, LoadDelta, Telemetry, parse, parse_telemetry
from meshgate.outage import OutageLog
from meshgate.protocol import ProtocolViolation, error_body
from tunnel import Frame, FrameType, Hello, Link, Mux, RefusedError, Stream, TunnelError

log = logging.getLogger(__name__)

TOUCH_EVERY_S = 30.0  # 1,000 nodes: ~33 row updates a second, not 100
FLUSH_SEEN_S = 2.0
KNOWN_MODELS_S = 5.0
REVOCATION_POLL_S = 1.0

NodeRequestHandler = Callable[[NodeConn, Stream, Frame], Awaitable[None]]


class Gateway:
    def __init__(
        self, store: Store, registry: Registry, on_request: NodeRequestHandler | None = None
    ) -> None:
        self.store = store
        self.registry = registry
        #: Requests a node opens (its local port was asked for a model it lacks); None: refused.
        self.on_request = on_request
        #: Enrolled, unrevoked identities: they may handshake past their address's rate limit
        #: (a site behind one NAT address reconnecting after a restart).
        self.known: set[str] = {r.did for r in store.list_nodes() if r.revoked_at is None}
        #: did -> (when heard, models from an inventory or None): not yet in the store
        self._seen: dict[str, tuple[float, list[str] | None]] = {}
        self._seen_now = asyncio.Event()
        self._models_gen = 0  # moves when the store's node models may have changed
        self._known: tuple[int, float, set[str]] | None = None
        #: did -> labels read by `authorize` for the link that follows (one per node)
        self._labels: dict[str, dict[str, str]] = {}

    def is_known(self, did: str) -> bool:
        return did in self.known

    async def authorize(self, hello: Hello, remote: str) -> dict[str, Any]:
        now = time.time()
        if hello.enroll is not None:
            token_id, secret = hello.enroll
            try:
                node = await asyncio.to_thread(
                    self.store.redeem_token, token_id, secret, hello.did, now
                )
            except EnrollmentRefused as exc:
                log.warning("enrollment refused for %s from %s: %s", hello.did, remote, exc)
                raise RefusedError(403, str(exc)) from None
            log.info("enrolled node %s from %s with labels %s", hello.did, remote, node.labels)
            self.known.add(hello.did)
            return {"did": hello.did, "enrolled": True, "labels": node.labels}
        record = await asyncio.to_thread(self.store.get_node, hello.did)
        if record is None:
            log.warning("refused unknown node %s from %s", hello.did, remote)
            raise RefusedError(403, f"unknown node {hello.did}: enroll it with a token first")
        if record.revoked_at is not None:
            self.known.discard(hello.did)
            log.warning("refused revoked node %s from %s", hello.did, remote)
            raise RefusedError(403, f"node {hello.did} has been revoked")
        fresh = await asyncio.to_thread(
            self.store.advance_handshake_ts, hello.did, hello.timestamp_ms
        )
        if not fresh:
            log.warning("refused replayed handshake of %s from %s", hello.did, remote)
            raise RefusedError(403, "handshake timestamp is not newer than the last one")
        self._labels[hello.did] = dict(record.labels)  # on_link reads them, not the store
        return {"did": hello.did, "enrolled": False, "labels": record.labels}

    async def on_link(self, link: Link) -> None:
        hello = link.hello
        assert hello is not None
        if hello.enroll is not None:
            await link.wait_closed()  # an enrollment connection carries no traffic
            return
        try:
            parse(hello.info, NodeHello)
        except ProtocolViolation as exc:
            log.warning("node %s sent a bad hello, closing its session: %s", hello.did, exc)
            await link.close(f"protocol error: {exc}"[:120])
            return
        labels = self._labels.pop(hello.did, None)
        if labels is None:  # authorized elsewhere (a test's own authorize, a replica hook)
            record = await asyncio.to_thread(self.store.get_node, hello.did)
            labels = dict(record.labels) if record else {}
        conn: NodeConn | None = None

        async def on_control(frame: Frame) -> None:
            if conn is not None:
                await self._control(conn, frame)

        async def on_stream(stream: Stream, frame: Frame) -> None:
            if conn is None or self.on_request is None:
                await stream.send(FrameType.ERROR, error_body(
                    404, "this coordinator takes no requests from nodes", hop="coordinator"))
                return
            await self.on_request(conn, stream, frame)

        mux = Mux(link, initiator=False, on_control=on_control, on_stream=on_stream,
                  raw_bodies=(FrameType.TELEMETRY,))
        conn = NodeConn(did=hello.did, labels=labels, link=link, mux=mux)
        # nothing is read before `mux.run` below: a partial, no closure's frame a message
        mux.on_control_now = functools.partial(self._control_now, conn)
        old = self.registry.add(conn)
        if old is not None:
            log.warning(
                "node %s connected again from %s; closing its older connection from %s "
                "(the newer connection wins)",
                hello.did, _addr(link), _addr(old.link),
            )
            await old.link.close("replaced by a newer connection of the same node")
        log.info("node %s connected from %s (%s)", hello.did, _addr(link), hello.info)
        try:
            await mux.run()
        except TunnelError as exc:
            log.warning("node %s link failed: %s", hello.did, exc)
        finally:
            self.registry.remove(conn)
            conn.fail_pending("node disconnected")
            if hello.did in self._seen:
                self._seen_now.set()  # what we heard from it is in the store soon after
            log.info("node %s disconnected", hello.did)

    def heard(self, did: str, now: float, models: list[str] | None = None) -> None:
        """Note that `did` was heard from (with its models after an inventory)."""
        held = self._seen.get(did)
        if models is None and held is not None:
            models = held[1]  # an inventory not yet written keeps its models
        self._seen[did] = (now, models)

    async def flush_seen(self) -> int:
        """Write what was heard since the last flush in one transaction; how many nodes."""
        seen, self._seen = self._seen, {}
        if seen:
            try:
                await asyncio.to_thread(self.store.touch_nodes, seen)
            except BaseException:
                for did, value in seen.items():  # kept for the next try, newer news first
                    self._seen.setdefault(did, value)
                raise
            if any(models is not None for _, models in seen.values()):
                self._models_gen += 1
        return len(seen)

    def known_models(self) -> set[str]:
        """Every model a connected or enrolled, unrevoked node said it serves (a request for
        one while no node serving it is connected is a 503, not a 404). The store's part is
        read again only after the gateway wrote new models there or KNOWN_MODELS_S passed,
        so requests for made-up names cannot make the coordinator scan its node table each.
        Safe to call from a worker thread (it copies what the loop changes)."""
        now = time.monotonic()
        cached = self._known
        if cached is None or cached[0] != self._models_gen or now - cached[1] > KNOWN_MODELS_S:
            cached = self._known = (self._models_gen, now, self.store.served_models())
        pending = [models for _, models in list(self._seen.values()) if models]
        return cached[2].union(*pending, self.registry.models())

    async def flush_seen_loop(self, period: float = FLUSH_SEEN_S) -> None:
        """Until cancelled: `flush_seen` every `period`, or at once when a node left."""
        outage = OutageLog(log, "writing when nodes were last seen")
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(period):
                        await self._seen_now.wait()
                self._seen_now.clear()
                try:
                    await self.flush_seen()  # what failed is kept for the next try
                except (SQLAlchemyError, CoordinatorError, OSError) as exc:  # database down
                    outage.failed(exc)
                else:
                    outage.succeeded()
        finally:
            with contextlib.suppress(SQLAlchemyError, CoordinatorError, OSError):
                await self.flush_seen()  # stopping: what was heard is not lost

    async def close_revoked(self) -> list[str]:
        """Close the tunnel of every connected node the store says is revoked."""
        if not self.registry.count():
            return []
        revoked: list[str] = []
        for did in await asyncio.to_thread(self.store.revoked_nodes):
            conn = self.registry.get(did)
            if conn is None:
                continue
            revoked.append(did)
            self.known.discard(did)
            self._models_gen += 1
            log.warning("node %s was revoked; closing its tunnel", did)
            self.registry.remove(conn)
            await conn.link.close("node revoked")
        return revoked

    async def watch_revocations(self, period: float = REVOCATION_POLL_S) -> None:
        """Until cancelled: every `period`, close the tunnels of revoked nodes."""
        outage = OutageLog(log, "checking for revoked nodes")
        while True:
            try:
                await self.close_revoked()
            except Exception as exc:  # noqa: BLE001 (logged by OutageLog; keep watching)
                outage.failed(exc)
            else:
                outage.succeeded()
            await asyncio.sleep(period)

    async def _control(self, conn: NodeConn, frame: Frame) -> None:
        try:
            await self._message(conn, frame)
        except ProtocolViolation as exc:
            # one line, then the session ends: nothing of the message reached the registry
            log.warning("node %s sent a bad %s frame, closing its session: %s", conn.did,
                        frame.type.name, exc)
            self.registry.remove(conn)
            await conn.link.close(f"protocol error: {exc}"[:120])

    async def _message(self, conn: NodeConn, frame: Frame) -> None:
        body = frame.body
        if frame.type == FrameType.INVENTORY:
            inventory = parse(body, Inventory)
            self.registry.set_inventory(conn, inventory, body)
            self.heard(conn.did, time.time(), conn.models)
            log.info("node %s serves %d model(s): %s", conn.did, len(conn.models),
                     clip(", ".join(conn.models), 500))  # peer data: never a huge line
        elif frame.type == FrameType.RESULT:
            conn.on_result(body if isinstance(body, dict) else {})
        elif frame.type == FrameType.TELEMETRY:
            self._telemetry(conn, parse_telemetry(body), body)

    def _control_now(self, conn: NodeConn, frame: Frame) -> bool:
        """Telemetry and load deltas, handled in the link's reader (nothing to wait for);
        a bad one goes the queued way, which logs it and closes the session."""
        if frame.type is not FrameType.TELEMETRY or self.registry.get(conn.did) is not conn:
            return False
        body = frame.body
        try:
            message = parse_telemetry(body)
        except ProtocolViolation:
            return False
        self._telemetry(conn, message, body)
        return True

    def _telemetry(self, conn: NodeConn, message: Telemetry | LoadDelta,
                   body: dict[str, Any] | bytes) -> None:
        if isinstance(message, LoadDelta):
            self.registry.apply_delta(conn, message)
            return
        self.registry.set_telemetry(conn, message, body)
        now = time.time()
        if now - conn.touched_at > TOUCH_EVERY_S:
            conn.touched_at = now
            self.heard(conn.did, now)


def _addr(link: Link) -> str:
    address = link.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
