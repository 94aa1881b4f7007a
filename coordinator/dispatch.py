"""Send one request down a node's tunnel and bring its answer back.

A request is committed to a node only when the node's first data frame
arrives: until then a failure (the node refused, its runner died, its tunnel
dropped) is retried on the next candidate, so the client sees nothing of it.
After the first chunk has gone to the client a failure can only end the
stream with an error event: the caller turns :class:`OpenAIError` from
:meth:`Attempt.rest` into one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from coordinator.registry import NodeConn, Registry
from meshgate.openai import OpenAIError
from meshgate.protocol import OpenRequest
from tunnel import ClosedError, Frame, FrameType, Stream, TunnelError

log = logging.getLogger(__name__)

MAX_TRIES = 3


@dataclass(eq=False)
class Attempt:
    """A request that a node has started answering."""

    request: OpenRequest
    node: NodeConn
    stream: Stream
    first: bytes
    started: float
    tries: int
    usage: dict[str, int] | None = None
    chunks: int = 1
    done: bool = False
    outcome: str = "streaming"
    _released: bool = field(default=False, repr=False)

    async def rest(self) -> AsyncIterator[bytes]:
        """Yield the data frames after the first; set `usage` from the end frame."""
        try:
            while True:
                frame = await self.stream.recv()
                if frame.type == FrameType.DATA:
                    self.chunks += 1
                    yield frame.body
                elif frame.type == FrameType.END:
                    self._finish(frame, "ok")
                    return
                elif frame.type == FrameType.ERROR:
                    self.outcome = "error_after_start"
                    raise _error_from_frame(frame)
        except ClosedError:
            self.outcome = "node_lost_mid_stream"
            raise OpenAIError(
                502, f"node {self.node.did} disconnected mid-response", hop="coordinator"
            ) from None
        finally:
            await self.close()

    async def collect(self) -> bytes:
        """For a non-streaming request: the whole response body."""
        parts = [self.first]
        async for part in self.rest():
            parts.append(part)
        return b"".join(parts)

    async def close(self) -> None:
        """Release the node; tell it to stop if the request did not finish."""
        if self._released:
            return
        self._released = True
        self.node.in_flight -= 1
        if not self.done:
            if self.outcome == "streaming":
                self.outcome = "client_cancelled"
            with contextlib.suppress(TunnelError):
                await self.stream.send(FrameType.CANCEL, None)

    def _finish(self, frame: Frame, outcome: str) -> None:
        body = frame.body if isinstance(frame.body, dict) else {}
        usage = body.get("usage")
        self.usage = usage if isinstance(usage, dict) else None
        self.done = True
        self.outcome = outcome
        self.node.served += 1


def _error_from_frame(frame: Frame) -> OpenAIError:
    body = frame.body if isinstance(frame.body, dict) else {}
    status = body.get("status")
    return OpenAIError(
        status if isinstance(status, int) and 400 <= status <= 599 else 502,
        str(body.get("message") or "node reported an error"),
        code=body.get("code") if isinstance(body.get("code"), str) else None,
        hop=str(body.get("hop") or "node"),
    )


def candidates(registry: Registry, model: str) -> list[NodeConn]:
    """Connected nodes serving `model`, least busy first (the scheduler refines this)."""
    nodes = registry.serving(model)
    nodes.sort(key=lambda n: (n.in_flight, n.rtt_ms or 0.0, n.did))
    return nodes


async def start(registry: Registry, request: OpenRequest) -> Attempt:
    """Open the request on the best node that answers; retry the next one on failure."""
    nodes = candidates(registry, request.model)
    if not nodes:
        raise OpenAIError(
            503,
            f"no connected node serves the model '{request.model}' right now",
            code="model_not_available",
            hop="coordinator",
        )
    failures: list[str] = []
    for tries, node in enumerate(nodes[:MAX_TRIES], start=1):
        attempt_or_reason = await _try_node(node, request, tries)
        if isinstance(attempt_or_reason, Attempt):
            return attempt_or_reason
        failures.append(f"{_short(node.did)}: {attempt_or_reason}")
        log.warning(
            "request %s failed before its first token on %s: %s",
            request.request_id, node.did, attempt_or_reason,
        )
    raise OpenAIError(
        503, "every node that serves the model failed: " + "; ".join(failures), hop="coordinator"
    )


async def _try_node(node: NodeConn, request: OpenRequest, tries: int) -> Attempt | str:
    started = time.perf_counter()
    node.in_flight += 1
    try:
        stream = await node.mux.open(request.to_wire())
        frame = await stream.recv()
    except ClosedError:
        node.in_flight -= 1
        return "tunnel closed"
    if frame.type == FrameType.DATA:
        return Attempt(request, node, stream, frame.body, started, tries)
    node.in_flight -= 1
    if frame.type == FrameType.ERROR:
        error = _error_from_frame(frame)
        if error.status < 500:
            raise error  # the request itself is wrong: another node will say the same
        return error.message
    return f"unexpected {frame.type.name} frame before data"


def _short(did: str) -> str:
    return did[:16] + "…" + did[-6:] if len(did) > 30 else did


def usage_row(attempt: Attempt, key_id: str | None) -> dict[str, Any]:
    usage = attempt.usage or {}
    return {
        "request_id": attempt.request.request_id,
        "key_id": key_id,
        "node_did": attempt.node.did,
        "model": attempt.request.model,
        "endpoint": attempt.request.endpoint,
        "prompt_tokens": int(usage.get("prompt_tokens", 0)),
        "completion_tokens": int(usage.get("completion_tokens", 0)),
        "latency_ms": (time.perf_counter() - attempt.started) * 1000,
        "outcome": attempt.outcome,
    }
