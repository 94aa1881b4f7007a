"""Streamed answers on the local port that notice the client leaving.

Starlette's StreamingResponse runs its body in a task group; these responses
send the body themselves and watch ``receive`` for ``http.disconnect`` beside
it, so that a client that leaves cancels the sender once, plainly in asyncio,
and the stream's cleanup (closing the runtime's stream, which stops generation
wherever it runs) goes to its end. The borrowed runtime (`stack`) is given back
whatever happens, even if the response never starts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

__all__ = ["WatchedResponse", "aclose"]

log = logging.getLogger(__name__)


async def aclose(chunks: AsyncIterator[bytes]) -> None:
    """Close an async generator (a plain iterator has nothing to close)."""
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class WatchedResponse(StreamingResponse):
    """Subclasses send the body in :meth:`_pump` and settle accounts in :meth:`_finished`."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        stack: AsyncExitStack,
        *,
        media_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(iter(()), media_type=media_type, headers=headers)
        self._chunks = chunks
        self._stack = stack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.create_task(self._pump(send))
        watch = asyncio.create_task(_until_disconnect(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watch):
                task.cancel()
            await asyncio.gather(pump, watch, return_exceptions=True)
            await aclose(self._chunks)
            await self._stack.aclose()
            self._finished()
        if pump.done() and not pump.cancelled() and pump.exception() is not None:
            log.warning("stream to the client failed: %r", pump.exception())

    async def _pump(self, send: Send) -> None:
        raise NotImplementedError

    def _finished(self) -> None:
        """After the stream ended, however it ended (the client may have left)."""
