"""Requests that nodes send up the tunnel: request path 1's way out.

An app on an edge box asks its local port (`127.0.0.1:11438`) for a model that
box does not serve. The node opens a stream to the coordinator with the same
OPEN body it would receive, and the coordinator treats it like a request on its
public API: the scheduler picks another node (or a cloud), with retry before the
first token, and the answer streams back down the same stream. The enrolled
node's identity is its credential (no API key rides on the tunnel); the ledger
row has no key and names the asking node in its route (``node:did:key:...``).

No API key vouches for a relayed request, so the coordinator bounds them itself
(``[relay]`` in coordinator.toml, :class:`RelayQuota`): each node may have
``per_node`` relayed requests running or starting at once, relayed requests
together may fill only ``queue_share`` of the dispatch queue (keyed apps keep the
rest), and they never reach a paid cloud unless ``cloud = true``: a node cannot be
trusted to police its own apps, and the box's local port takes requests from any
local program. What is refused is a 429 with a ledger row, like every outcome.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import Counter
from typing import Any

import anyio

from coordinator.api_context import ApiContext
from coordinator.api_plan import plan
from coordinator.config import RelayConfig
from coordinator.dispatch import Served
from coordinator.refusals import refusal_row, with_status
from coordinator.registry import NodeConn
from coordinator.scheduler import Budget
from meshgate.bounds import clip
from meshgate.openai import OpenAIError, parse
from meshgate.protocol import OpenRequest, ProtocolViolation, error_body
from tunnel import Frame, FrameType, Stream, TunnelError, until_cancelled

__all__ = ["relay"]

log = logging.getLogger(__name__)


class RelayQuota:
    """How many relayed requests each node has running or starting, and all nodes together
    inside dispatch (waiting for a node counts there)."""

    def __init__(self, config: RelayConfig, queue_size: int) -> None:
        self.config = config
        self.dispatching_cap = max(1, int(queue_size * config.queue_share))
        self.per_node: Counter[str] = Counter()
        self.dispatching = 0

    def refusal(self, did: str) -> OpenAIError | None:
        if self.per_node[did] >= self.config.per_node:
            return OpenAIError(429, f"this node already has {self.config.per_node} requests "
                               "relayed through the coordinator; retry when one ends",
                               code="relay_quota", hop="coordinator")
        if self.dispatching >= self.dispatching_cap:
            return OpenAIError(429, "relayed requests fill their share of the coordinator's "
                               f"queue ({self.dispatching_cap}); retry later",
                               code="queue_full", hop="coordinator")
        return None


def quota_of(ctx: ApiContext) -> RelayQuota:
    quota = getattr(ctx, "relay_quota", None)
    if quota is None:
        quota = RelayQuota(ctx.config.relay, ctx.config.dispatch.queue_size)
        ctx.relay_quota = quota  # type: ignore[attr-defined]
    return quota


async def relay(ctx: ApiContext, asker: NodeConn, stream: Stream, frame: Frame) -> None:
    """Answer one node-originated request; stop if the node cancels it (its client left)."""
    try:
        request = OpenRequest.from_wire(frame.body)
    except ProtocolViolation as exc:
        await stream.send(FrameType.ERROR, error_body(400, str(exc), hop="coordinator"))
        return
    quota = quota_of(ctx)
    refused = quota.refusal(asker.did)  # before any work or await: a flood costs a counter
    if refused is not None:
        await _refuse(ctx, stream, request, refused, f"node:{asker.did}")
        return
    quota.per_node[asker.did] += 1
    try:
        if await until_cancelled(stream, _answer(ctx, asker, stream, request, quota)):
            log.info("node %s cancelled stream %s (its client left)", asker.did, stream.id)
    finally:
        quota.per_node[asker.did] -= 1
        if quota.per_node[asker.did] <= 0:
            del quota.per_node[asker.did]


async def _answer(ctx: ApiContext, asker: NodeConn, stream: Stream, request: OpenRequest,
                  quota: RelayQuota) -> None:
    try:
        parsed = parse(request.body, request.endpoint)
        body = parsed.body
        route, want = await plan(ctx, parsed, None)
    except OpenAIError as exc:
        await _refuse(ctx, stream, request, exc, f"node:{asker.did}")
        return
    log.info("request %s from node %s: %s %s", request.request_id, asker.did,
             request.endpoint, clip(body["model"]))
    wanted = OpenRequest(request.request_id, request.endpoint, want.models[0],
                         bool(body.get("stream")), request.body)
    route_text = f"node:{asker.did}" + (f" {route}" if route.task else "")
    if not quota.config.cloud:
        want = dataclasses.replace(want, budget_state=Budget.OVER)  # no paid cloud
    assert ctx.dispatcher is not None
    quota.dispatching += 1
    try:
        served = await ctx.dispatcher.start(wanted, want)
    except OpenAIError as exc:
        if exc.status == 503 and not quota.config.cloud and ctx.dispatcher.clouds:
            exc.message += (" (requests relayed from nodes never use paid clouds unless the "
                            "coordinator's [relay] cloud = true)")
        await _refuse(ctx, stream, wanted, exc, route_text)
        return
    finally:
        quota.dispatching -= 1
    end: tuple[FrameType, Any] = (FrameType.END, None)
    committed = False
    try:
        await _forward(served, wanted.stream, stream)
        end = (FrameType.END, {"usage": served.usage})
    except OpenAIError as exc:
        end = (FrameType.ERROR, error_body(exc.status, exc.message, code=exc.code,
                                           hop=exc.hop or "coordinator", param=exc.param))
    finally:
        with anyio.CancelScope(shield=True):
            await served.close()
            committed = True  # the row is stored before the answer's end goes down
            await ctx.commit(with_status(served.row(None, route_text)))
    if committed:
        with contextlib.suppress(TunnelError):
            await stream.send(*end)


async def _forward(served: Served, streaming: bool, stream: Stream) -> None:
    if streaming:
        await stream.send(FrameType.DATA, served.first)
        async for chunk in served.rest():
            await stream.send(FrameType.DATA, chunk)
    else:
        await stream.send(FrameType.DATA, await served.collect())


async def _refuse(ctx: ApiContext, stream: Stream, request: OpenRequest, exc: OpenAIError,
                  route: str) -> None:
    """Answer `exc` to the node, with the request's ledger row (every outcome has one)."""
    if ctx.metrics is not None:
        ctx.metrics.refused(exc.status, request.model, exc.code)
    await ctx.commit(refusal_row(exc, request_id=request.request_id, key_id=None,
                                 model=request.model, endpoint=request.endpoint, route=route))
    await _send_error(stream, exc)


async def _send_error(stream: Stream, exc: OpenAIError) -> None:
    with contextlib.suppress(TunnelError):
        await stream.send(
            FrameType.ERROR,
            error_body(exc.status, exc.message, code=exc.code, hop=exc.hop or "coordinator",
                       param=exc.param),
        )
