"""A runtime behind any server that speaks OpenAI's wire format.

:class:`OpenAIHttpRuntime` talks to our llama.cpp worker over its unix socket
(kind ``llama.cpp``, made by :class:`~node_agent.runtimes.llama.LlamaRunner`),
or to a server already running on the box over TCP (kind ``upstream``), with
one pool of kept-alive HTTP/1.1 connections per runtime
(:class:`~node_agent.runtimes.http1.Http1Pool`, httptools' C parser), made on first
use. Bodies pass through as bytes;
only ``model`` is rewritten, and only when the server knows the model by
another name. Errors come out as :class:`OpenAIError`: the server's own status
and message with ``hop="runner"``, or 503 ``hop="node"`` when it cannot be
reached.

The pool rather than a general client: measured in one process against the instant
fake upstream, interleaved, httpx spent about 1.2 ms of CPU on a request, aiohttp
0.13-0.17 ms (0.30 ms on a 16-chunk stream) and the pool 0.03-0.05 ms (0.21 ms);
on the node's local port the client was a large part of what the node added.
A stream is read to its end after ``[DONE]`` (a short, bounded wait) so its
connection goes back to the pool; one left early closes its connection, so the
runner sees its client go.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

from meshgate.openai import OpenAIError
from node_agent.runtimes.base import Usage, flattened, usage_of
from node_agent.runtimes.http1 import Http1Pool, Http1Response

DATA_PREFIX = b"data:"
DONE = b"[DONE]"
CONNECT_TIMEOUT_S = 5.0
#: After ``[DONE]``, at most this long and this much to read the body's end (then: close).
DRAIN_TIMEOUT_S = 1.0
DRAIN_MAX_BYTES = 64 * 1024
#: An error answer's body is read up to this much.
MAX_ERROR_BYTES = 1024 * 1024
HEALTH_TIMEOUT_S = 5.0
#: A pooled connection idle this long is closed by us, before the server's own keep-alive
#: (uvicorn's, under our runner and most upstreams: 5 s) can close it as we send on it
#: (a POST is never resent).
KEEPALIVE_S = 4.0


class SSEParser:
    """Turns a byte stream of server-sent events into their data payloads (pure)."""

    def __init__(self) -> None:
        self._buffer = b""
        self.seen = b""
        """the bytes the last `feed` read its payloads from (its whole lines and more)"""

    def feed(self, data: bytes) -> list[bytes]:
        self.seen = seen = self._buffer + data if self._buffer else data
        lines = seen.split(b"\n")
        self._buffer = lines.pop()
        return [line[5:].strip() for line in lines if line[:5] == DATA_PREFIX]  # 5: its length


_ERROR_KEY = b'"error"'


def is_error_event(payload: bytes) -> bool:
    """Whether a stream payload is an error object rather than a chunk (cheap for chunks).
    Never without `_ERROR_KEY` in it (`stream_batches` skips the test for bytes without)."""
    if payload.startswith(b'{"error"'):
        return True
    if _ERROR_KEY not in payload[:24]:
        return False
    try:
        return isinstance(json.loads(payload).get("error"), dict)
    except (ValueError, AttributeError):
        return False


def _until_end(payloads: list[bytes]) -> tuple[list[bytes], bytes | None]:
    """The chunks before ``[DONE]`` or an error event, and that payload (None: neither)."""
    for at, payload in enumerate(payloads):
        if payload == DONE or is_error_event(payload):
            return payloads[:at], payload
    return payloads, None


def with_model(body: bytes, model: str) -> bytes:
    """`body` with its ``model`` replaced (parses only when it differs)."""
    if b'"model":"' + model.encode() + b'"' in body:
        return body
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise OpenAIError(400, f"request body is not valid JSON: {exc}", hop="node") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "request body must be a JSON object", hop="node")
    if data.get("model") == model:
        return body
    data["model"] = model
    return json.dumps(data, separators=(",", ":")).encode()


class Lifecycle(Protocol):
    """What starts and stops the process behind a runtime (a supervised runner)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def _error_of(response: Http1Response) -> OpenAIError:
    data = await response.read(MAX_ERROR_BYTES)
    try:
        body: Any = json.loads(data)
    except ValueError:
        body = data.decode("utf-8", "replace")
    return OpenAIError.from_body(response.status, body, hop="runner")


async def _drain(response: Http1Response) -> None:
    """Read what is left of a body whose last event came (so its connection is kept)."""
    if response.finished:
        return
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            await response.read(DRAIN_MAX_BYTES)
    except (TimeoutError, OSError):
        response.close()


def _pool_for(url: str, uds: str | None) -> Http1Pool:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OpenAIError(500, f"not an http(s) URL: {url!r}", hop="node")
    context = None
    if parts.scheme == "https":
        import ssl  # deferred: only for an upstream over TLS

        context = ssl.create_default_context()
    port = parts.port or (443 if context else 80)
    return Http1Pool(parts.hostname, port, uds=uds, connect_timeout_s=CONNECT_TIMEOUT_S,
                     keepalive_s=KEEPALIVE_S, ssl=context)


def _target(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class OpenAIHttpRuntime:
    """A runtime behind an OpenAI-compatible HTTP server.

    `base_url` is the API root, ``/v1`` included; with `uds` the server is reached
    on that unix socket (the URL's host is then only a name). `check` runs before
    each request and may raise to refuse at once (a supervisor uses it while its
    runner restarts); `health_url` defaults to ``{base_url}/models`` (same server).
    """

    def __init__(
        self,
        name: str,
        kind: str,
        base_url: str,
        *,
        uds: str | None = None,
        upstream_model: str | None = None,
        health_url: str | None = None,
        check: Callable[[], None] | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.upstream_model = upstream_model
        self.health_url = health_url or base_url.rstrip("/") + "/models"
        self._check = check or (lambda: None)
        self._lifecycle = lifecycle
        self._base_url = base_url
        self._base = _target(base_url).rstrip("/") + "/"
        self._uds = uds
        self._pool: Http1Pool | None = None

    @property
    def pool(self) -> Http1Pool:
        """The connection pool (made on first use, and again after :meth:`aclose`)."""
        if self._pool is None or self._pool.closed:
            self._pool = _pool_for(self._base_url, self._uds)
        return self._pool

    def _body(self, body: bytes) -> bytes:
        return with_model(body, self.upstream_model) if self.upstream_model else body

    def _unreachable(self, exc: BaseException) -> OpenAIError:
        self._check()
        return OpenAIError(503, f"runner for {self.name} is unreachable: {exc!r}", hop="node")

    async def health(self) -> bool:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                response = await self.pool.request("GET", _target(self.health_url))
                try:
                    await response.read(MAX_ERROR_BYTES)
                finally:
                    response.release()
        except (OSError, TimeoutError, OpenAIError):
            return False
        return response.status == 200

    async def load(self, keep_alive: float | str | None = None) -> None:
        """Start the supervised runner behind it, if any (a server not ours loads itself)."""
        if self._lifecycle is not None:
            await self._lifecycle.start()

    async def unload(self) -> None:
        """Stop the supervised runner behind it; refused for a server that is not ours."""
        if self._lifecycle is None:
            raise OpenAIError(
                400, f"{self.name} is not a local runner; nothing to unload", hop="node"
            )
        await self._lifecycle.stop()

    async def embed(self, body: bytes) -> tuple[bytes, Usage | None]:
        return await self.complete("embeddings", body)

    async def complete(self, endpoint: str, body: bytes) -> tuple[bytes, Usage | None]:
        self._check()
        try:
            response = await self.pool.request("POST", self._base + endpoint, self._body(body))
        except (OSError, TimeoutError) as exc:
            raise self._unreachable(exc) from None
        try:
            if response.status != 200:
                raise await _error_of(response)
            data = await response.read()
            response.release_soon()  # read to its end: back to the pool once the answer
            # went on (`release_soon`), not on its way
        except (OSError, TimeoutError) as exc:
            raise self._unreachable(exc) from None
        finally:
            response.release()  # back to the pool when read to its end; else closed (once)
        return data, usage_of(data)

    def stream(self, endpoint: str, body: bytes) -> AsyncIterator[bytes]:
        return flattened(self.stream_batches(endpoint, body))

    async def stream_batches(self, endpoint: str, body: bytes
                             ) -> AsyncGenerator[list[bytes], None]:
        """`stream`'s chunks, a list for those one read of the server brought (so they can
        go on together: one tunnel frame for the lot)."""
        self._check()
        try:
            response = await self.pool.request("POST", self._base + endpoint, self._body(body))
        except (OSError, TimeoutError) as exc:
            raise self._unreachable(exc) from None
        try:
            if response.status != 200:
                raise await _error_of(response)
            parser = SSEParser()
            async for data in response.chunks():
                payloads = parser.feed(data)
                if not payloads:
                    continue
                if DONE not in payloads and _ERROR_KEY not in parser.seen:
                    yield payloads  # the usual read: token events only (an error event
                    continue  # holds its key in its first bytes: `is_error_event`)
                if _ERROR_KEY in parser.seen:
                    batch, end = _until_end(payloads)
                else:  # no error event in this read: it ends at [DONE]
                    at = payloads.index(DONE)
                    batch, end = payloads[:at], DONE
                if batch:  # what came before [DONE] or an error goes out first
                    yield batch
                if end == DONE:
                    await _drain(response)
                    return
                if end is not None:
                    raise OpenAIError.from_body(502, json.loads(end), hop="runner")
        except OSError as exc:
            raise OpenAIError(502, f"runner for {self.name} failed mid-stream: {exc!r}",
                              hop="runner") from None
        finally:
            response.release()  # back to the pool when read to its end; else closed
        raise OpenAIError(502, f"runner for {self.name} ended the stream without [DONE]",
                          hop="runner")

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def describe(self) -> dict[str, Any] | None:
        return None
