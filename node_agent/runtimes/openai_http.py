"""A runtime behind any server that speaks OpenAI's wire format.

:class:`OpenAIHttpRuntime` talks to our llama.cpp worker over its unix socket
(kind ``llama.cpp``, made by :class:`~node_agent.runtimes.llama.LlamaRunner`),
or to a server already running on the box over TCP (kind ``upstream``), with
one pooled ``httpx`` client per runtime. Bodies pass through as bytes;
only ``model`` is rewritten, and only when the server knows the model by
another name. Errors come out as :class:`OpenAIError`: the server's own status
and message with ``hop="runner"``, or 503 ``hop="node"`` when it cannot be
reached.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import httpx

from meshgate.openai import OpenAIError
from node_agent.runtimes.base import Usage, usage_of

DATA_PREFIX = b"data:"
DONE = b"[DONE]"
TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None)


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


def _error_of(response: httpx.Response) -> OpenAIError:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return OpenAIError.from_body(response.status_code, body, hop="runner")


class OpenAIHttpRuntime:
    """A runtime behind an OpenAI-compatible HTTP server.

    `base_url` is the API root, ``/v1`` included. `check` runs before each
    request and may raise to refuse at once (a supervisor uses it while its
    runner restarts); `health_url` defaults to ``{base_url}/models``.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        base_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        transport_factory: Callable[[], httpx.AsyncBaseTransport] | None = None,
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
        self._transport_factory = transport_factory
        self._client = self._new_client(transport)

    def _new_client(self, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
        if transport is None and self._transport_factory is not None:
            transport = self._transport_factory()
        return httpx.AsyncClient(
            base_url=self._base_url, transport=transport, timeout=TIMEOUT,
            headers={"content-type": "application/json"},
        )

    @property
    def client(self) -> httpx.AsyncClient:
        """The pooled client (made again after :meth:`aclose`, for a runner started again)."""
        if self._client.is_closed and self._transport_factory is not None:
            self._client = self._new_client()
        return self._client

    def _body(self, body: bytes) -> bytes:
        return with_model(body, self.upstream_model) if self.upstream_model else body

    def _unreachable(self, exc: httpx.HTTPError) -> OpenAIError:
        self._check()
        return OpenAIError(503, f"runner for {self.name} is unreachable: {exc!r}", hop="node")

    async def health(self) -> bool:
        try:
            response = await self.client.get(self.health_url, timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

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
            response = await self.client.post(endpoint, content=self._body(body))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.status_code != 200:
            raise _error_of(response)
        return response.content, usage_of(response.content)

    async def stream(self, endpoint: str, body: bytes) -> AsyncIterator[bytes]:
        self._check()
        client = self.client
        request = client.build_request("POST", endpoint, content=self._body(body))
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        try:
            if response.status_code != 200:
                await response.aread()
                raise _error_of(response)
            parser = SSEParser()
            async for data in response.aiter_bytes():
                for payload in parser.feed(data):
                    if payload == DONE:
                        return
                    if is_error_event(payload):
                        raise OpenAIError.from_body(502, json.loads(payload), hop="runner")
                    yield payload
        except httpx.HTTPError as exc:
            raise OpenAIError(502, f"runner for {self.name} failed mid-stream: {exc!r}",
                              hop="runner") from None
        finally:
            await response.aclose()
        raise OpenAIError(502, f"runner for {self.name} ended the stream without [DONE]",
                          hop="runner")

    async def aclose(self) -> None:
        await self._client.aclose()

    def describe(self) -> dict[str, Any] | None:
        return None

