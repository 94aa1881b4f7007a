"""Models this box does not serve, asked of the coordinator over the tunnel.

Request path 1: an app on an edge box asks its local port for a model. If a
local runtime has it, it runs here; otherwise, while the tunnel is up, the node
opens a stream to the coordinator with the usual OPEN body and the coordinator
places it like any request (another node, or a cloud). `MeshRuntime` is that
way out behind the ordinary runtime interface, so the local proxy streams its
answer like any other. A client that leaves cancels the stream upstream.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from meshgate.openai import OpenAIError
from meshgate.protocol import OpenRequest, error_of
from node_agent.runtimes.base import Usage, usage_of
from tunnel import ClosedError, FrameType, Mux, Stream, TunnelError

__all__ = ["MeshRuntime"]

log = logging.getLogger(__name__)


class MeshRuntime:
    """One model, served by the mesh through the coordinator (kind ``mesh``)."""

    kind = "mesh"

    def __init__(self, name: str, mux: Callable[[], Mux | None]) -> None:
        self.name = name
        self._mux = mux

    async def health(self) -> bool:
        return self._mux() is not None

    async def load(self, keep_alive: float | str | None = None) -> None:
        """Nothing to do: the coordinator places the model (and may load it somewhere)."""

    async def unload(self) -> None:
        raise OpenAIError(400, f"{self.name} is not served here; nothing to unload", hop="node")

    async def embed(self, body: bytes) -> tuple[bytes, Usage | None]:
        return await self.complete("embeddings", body)

    async def aclose(self) -> None:
        """Nothing held: each request is its own tunnel stream."""

    def describe(self) -> dict[str, Any] | None:
        return None

    async def _open(self, endpoint: str, body: bytes, stream: bool) -> Stream:
        mux = self._mux()
        if mux is None:
            raise OpenAIError(
                503,
                f"{self.name} is not served here and the coordinator is not connected",
                code="no_capacity",
                hop="node",
            )
        request = OpenRequest("req_" + secrets.token_hex(8), endpoint, self.name, stream, body)
        try:
            return await mux.open(request.to_wire())
        except TunnelError as exc:
            raise OpenAIError(
                503, f"the tunnel to the coordinator is down: {exc}", hop="node"
            ) from None

    async def _frames(
        self, stream: Stream, usage: list[dict[str, int] | None]
    ) -> AsyncGenerator[bytes, None]:
        """DATA bodies until END (its usage into `usage`); CANCEL upstream if abandoned."""
        finished = False
        try:
            while True:
                try:
                    frame = await stream.recv()
                except ClosedError:
                    raise OpenAIError(
                        502,
                        "the tunnel to the coordinator closed mid-response",
                        code="node_lost",
                        hop="node",
                    ) from None
                if frame.type == FrameType.DATA:
                    yield frame.body if isinstance(frame.body, bytes) else bytes(frame.body)
                elif frame.type == FrameType.END:
                    finished = True
                    body = frame.body if isinstance(frame.body, dict) else {}
                    got = body.get("usage")
                    usage.append(got if isinstance(got, dict) else None)
                    return
                elif frame.type in (FrameType.ERROR, FrameType.CANCEL):
                    finished = True
                    raise error_of(
                        frame.body, hop="coordinator", default="the coordinator reported an error"
                    )
        finally:
            if not finished:  # the client left: stop the work wherever it runs
                log.info("cancelling %s upstream: the client left", self.name)
                with contextlib.suppress(TunnelError):
                    await stream.send(FrameType.CANCEL, None)

    async def complete(self, endpoint: str, body: bytes) -> tuple[bytes, Usage | None]:
        usage: list[dict[str, int] | None] = []
        stream = await self._open(endpoint, body, False)
        data = b"".join([part async for part in self._frames(stream, usage)])
        if not usage:
            raise OpenAIError(502, "the coordinator ended the answer early", hop="node")
        return data, usage[0] or usage_of(data)

    async def stream(self, endpoint: str, body: bytes) -> AsyncIterator[bytes]:
        stream = await self._open(endpoint, body, True)
        frames = self._frames(stream, [])
        try:
            async for chunk in frames:
                yield chunk
        finally:
            await frames.aclose()
