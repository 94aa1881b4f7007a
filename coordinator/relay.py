"""Requests that nodes send up the tunnel: request path 1's way out.

An app on an edge box asks its local port (`127.0.0.1:11438`) for a model that
box does not serve. The node opens a stream to the coordinator with the same
OPEN body it would receive, and the coordinator treats it like a request on its
public API: the scheduler picks another node (or a cloud), with retry before the
first token, and the answer streams back down the same stream. The enrolled
node's identity is its credential (no API key rides on the tunnel); the ledger
row has no key and names the asking node in its route (``node:did:key:...``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import anyio

from coordinator.api import ApiContext, plan
from coordinator.dispatch import Served
from coordinator.refusals import refusal_row, with_status
from coordinator.registry import NodeConn
from meshgate.bounds import clip
from meshgate.openai import OpenAIError, parse
from meshgate.protocol import OpenRequest, ProtocolViolation, error_body
from tunnel import Frame, FrameType, Stream, TunnelError, until_cancelled

__all__ = ["relay"]

log = logging.getLogger(__name__)


async def relay(ctx: ApiContext, asker: NodeConn, stream: Stream, frame: Frame) -> None:
    """Answer one node-originated request; stop if the node cancels it (its client left)."""
    if await until_cancelled(stream, _answer(ctx, asker, stream, frame)):
        log.info("node %s cancelled stream %s (its client left)", asker.did, stream.id)


async def _answer(ctx: ApiContext, asker: NodeConn, stream: Stream, frame: Frame) -> None:
    try:
        request = OpenRequest.from_wire(frame.body)
    except ProtocolViolation as exc:
        await stream.send(FrameType.ERROR, error_body(400, str(exc), hop="coordinator"))
        return
    asked_by = f"node:{asker.did}"
    try:
        parsed = parse(request.body, request.endpoint)
        body = parsed.body
        route, want = await plan(ctx, parsed, None)
    except OpenAIError as exc:
        await _refuse(ctx, stream, exc, request, asked_by)
        return
    log.info("request %s from node %s: %s %s", request.request_id, asker.did,
             request.endpoint, clip(body["model"]))
    wanted = OpenRequest(request.request_id, request.endpoint, want.models[0],
                         bool(body.get("stream")), request.body)
    route_text = asked_by + (f" {route}" if route.task else "")
    assert ctx.dispatcher is not None
    try:
        served = await ctx.dispatcher.start(wanted, want)
    except OpenAIError as exc:
        await _refuse(ctx, stream, exc, wanted, route_text)
        return
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


async def _refuse(ctx: ApiContext, stream: Stream, exc: OpenAIError, request: OpenRequest,
                  route: str) -> None:
    """Refuse a node's request: its ledger row, then the ERROR frame."""
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
