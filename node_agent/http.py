"""HTTP pieces both APIs of the local port share: the body, JSON answers, streamed answers.

:func:`read_body` reads a request body, refused with 413 as soon as it is known to
exceed the limit. :func:`note` and :func:`noted_close` put a request's model and usage
where the access line reads them. :class:`WatchedResponse` sends an already framed body
(SSE events, NDJSON lines) itself and watches ``receive`` for ``http.disconnect`` beside
it, so that a client that leaves cancels the sender once, plainly in asyncio, and
`close` (which stops the runtime's work wherever it runs, gives the model back and
meters the request) runs exactly once, whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from meshgate.openai import MAX_BODY_BYTES, OpenAIError

if TYPE_CHECKING:
    from node_agent.pipeline import Streamed

__all__ = [
    "JSON", "WatchedResponse", "json_response", "note", "noted_close", "read_body", "read_raw_body",
]

JSON = "application/json"

log = logging.getLogger(__name__)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit`."""
    declared = request.headers.get("content-length", "").encode("latin-1")
    return await read_raw_body(request.receive, declared, limit)


async def read_raw_body(receive: Receive, declared: bytes, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body of an ASGI request whose ``Content-Length`` is `declared` (b"" if none),
    refused with 413 as soon as it is known to exceed `limit`."""
    if declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"request body is {declared.decode()} bytes; the limit is {limit}")
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body  # the whole body in one message: the usual case
    parts, size = [body], len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] != "http.request":
            break
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise OpenAIError(413, f"request body exceeds the limit of {limit} bytes")
        parts.append(part)
    return b"".join(parts)


def note(scope: Scope, model: str, usage: Mapping[str, int] | None = None) -> None:
    """What the access line (meshgate/logs.py) reports of this request: model, tokens
    (in ``scope["state"]``, which is ``request.state``)."""
    state = scope.setdefault("state", {})
    state["model"] = model
    if usage:
        state["usage"] = dict(usage)


def noted_close(scope: Scope, streamed: Streamed) -> Callable[[], Awaitable[None]]:
    """`streamed`'s close, then its usage noted for the access line (written after it)."""

    async def close() -> None:
        try:
            await streamed.aclose()
        finally:
            note(scope, streamed.meter.model, streamed.meter.usage)

    return close


def json_response(data: object, status: int = 200) -> Response:
    """`data` as compact JSON."""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(body, status_code=status, media_type=JSON)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class WatchedResponse(StreamingResponse):
    """`body`'s parts as one streamed response; `close` once it ended, however it ended."""

    def __init__(
        self,
        body: AsyncIterable[bytes],
        close: Callable[[], Awaitable[None]],
        *,
        media_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(iter(()), media_type=media_type, headers=headers)
        self._parts = body
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The parts are sent from this task; one watcher task waits for http.disconnect
        # and, while they are still being sent, cancels this task (one task a stream, not two).
        task = asyncio.current_task()
        assert task is not None
        pumping, left = True, False

        def client_left(_: asyncio.Task[None]) -> None:
            nonlocal left
            if pumping:  # else the answer is done: nothing to stop (no stray cancel)
                left = True
                task.cancel()

        watch = asyncio.create_task(_until_disconnect(receive))
        watch.add_done_callback(client_left)
        failed: Exception | None = None
        try:
            await self._pump(send)
        except asyncio.CancelledError:
            if not left:
                raise  # cancelled from outside (shutdown): still closed below
            task.uncancel()
        except Exception as exc:  # noqa: BLE001 - the client's side failed: logged, closed
            failed = exc
        finally:
            pumping = False
            watch.remove_done_callback(client_left)
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            close = getattr(self._parts, "aclose", None)
            try:
                if close is not None:
                    await close()
            finally:
                await self._close()
        if failed is not None:
            log.warning("stream to the client failed: %r", failed)

    async def _pump(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async for part in self._parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
