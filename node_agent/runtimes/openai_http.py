"""A runtime behind any server that speaks OpenAI's wire format.

:class:`OpenAIHttpRuntime` talks to our llama.cpp worker over its unix socket
(kind ``llama.cpp``, made by :class:`~node_agent.runtimes.llama.LlamaRunner`),
or to a server already running on the box over TCP (kind ``upstream``), with
one pooled ``aiohttp`` client session per runtime, made on first use (so an
idle daemon never imports it). Bodies pass through as bytes;
only ``model`` is rewritten, and only when the server knows the model by
another name. Errors come out as :class:`OpenAIError`: the server's own status
and message with ``hop="runner"``, or 503 ``hop="node"`` when it cannot be
reached.

aiohttp rather than httpx: measured side by side on the instant fake upstream
(``scripts/bench/overhead.py``'s shapes, one process, interleaved), httpx spends
about 1.2 ms of CPU on a request and aiohttp 0.3 ms (its parser is C); on the
node's local port that was most of what the node added. A stream is read to its
end after ``[DONE]`` (a short, bounded wait) so its connection goes back to the pool.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from meshgate.openai import OpenAIError
from node_agent.runtimes.base import Usage, usage_of

if TYPE_CHECKING:
    import aiohttp

DATA_PREFIX = b"data:"
DONE = b"[DONE]"
CONNECT_TIMEOUT_S = 5.0
#: After ``[DONE]``, at most this long and this much to read the body's end (then: close).
DRAIN_TIMEOUT_S = 1.0
DRAIN_MAX_BYTES = 64 * 1024
#: A pooled connection idle this long is closed by us, before the server's own keep-alive
#: (uvicorn's, under our runner and most upstreams: 5 s) can close it as we send on it
#: (aiohttp would not resend a POST; aiohttp's own default is 15 s).
KEEPALIVE_S = 4.0


class SSEParser:
    """Turns a byte stream of server-sent events into their data payloads (pure)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        payloads = []
        for line in lines:
            if line.startswith(DATA_PREFIX):
                payloads.append(line[len(DATA_PREFIX):].strip())
        return payloads


def is_error_event(payload: bytes) -> bool:
    """Whether a stream payload is an error object rather than a chunk (cheap for chunks)."""
    if payload.startswith(b'{"error"'):
        return True
    if b'"error"' not in payload[:24]:
        return False
    try:
        return isinstance(json.loads(payload).get("error"), dict)
    except (ValueError, AttributeError):
        return False


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


async def _error_of(response: aiohttp.ClientResponse) -> OpenAIError:
    data = await response.read()
    try:
        body: Any = json.loads(data)
    except ValueError:
        body = data.decode("utf-8", "replace")
    return OpenAIError.from_body(response.status, body, hop="runner")


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read what is left of a body whose last event came (so its connection is kept)."""
    content, left = response.content, DRAIN_MAX_BYTES
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while not content.at_eof() and left > 0:
                left -= len(await content.readany())
    except (TimeoutError, OSError, ValueError):
        response.close()
        return
    if not content.at_eof():
        response.close()


class OpenAIHttpRuntime:
    """A runtime behind an OpenAI-compatible HTTP server.

    `base_url` is the API root, ``/v1`` included; with `uds` the server is reached
    on that unix socket (the URL's host is then only a name). `check` runs before
    each request and may raise to refuse at once (a supervisor uses it while its
    runner restarts); `health_url` defaults to ``{base_url}/models``.
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
        self._base = base_url.rstrip("/") + "/"
        self._uds = uds
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled session (made on first use, and again after :meth:`aclose`)."""
        if self._session is None or self._session.closed:
            import aiohttp  # deferred: an idle daemon never needs it

            connector = (aiohttp.UnixConnector(path=self._uds, keepalive_timeout=KEEPALIVE_S)
                         if self._uds else aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_S))
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
                headers={"content-type": "application/json"},
            )
        return self._session

    def _body(self, body: bytes) -> bytes:
        return with_model(body, self.upstream_model) if self.upstream_model else body

    def _unreachable(self, exc: BaseException) -> OpenAIError:
        self._check()
        return OpenAIError(503, f"runner for {self.name} is unreachable: {exc!r}", hop="node")

    async def health(self) -> bool:
        import aiohttp

        try:
            async with self.session.get(self.health_url,
                                        timeout=aiohttp.ClientTimeout(total=5.0)) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

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
        import aiohttp

        self._check()
        try:
            async with self.session.post(self._base + endpoint, data=self._body(body)) as response:
                if response.status != 200:
                    raise await _error_of(response)
                data = await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._unreachable(exc) from None
        return data, usage_of(data)

    async def stream(self, endpoint: str, body: bytes) -> AsyncIterator[bytes]:
        import aiohttp

        self._check()
        try:
            response = await self.session.post(self._base + endpoint, data=self._body(body))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._unreachable(exc) from None
        try:
            if response.status != 200:
                raise await _error_of(response)
            parser = SSEParser()
            async for data in response.content.iter_any():
                for payload in parser.feed(data):
                    if payload == DONE:
                        await _drain(response)
                        return
                    if is_error_event(payload):
                        raise OpenAIError.from_body(502, json.loads(payload), hop="runner")
                    yield payload
        except (aiohttp.ClientError, OSError) as exc:
            raise OpenAIError(502, f"runner for {self.name} failed mid-stream: {exc!r}",
                              hop="runner") from None
        finally:
            response.release()  # back to the pool when read to its end; else closed
        raise OpenAIError(502, f"runner for {self.name} ended the stream without [DONE]",
                          hop="runner")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def describe(self) -> dict[str, Any] | None:
        return None
