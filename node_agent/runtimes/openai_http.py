"""Runtimes: whatever answers OpenAI requests for one model on this box.

Every runtime speaks the same small interface, :class:`Runtime`. The one
implementation here, :class:`OpenAIHttpRuntime`, talks to any server that
speaks OpenAI's wire format: our llama.cpp worker over its unix socket, or a
server already running on the box over TCP. Bodies pass through as bytes;
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

DATA_PREFIX = b"data:"
DONE = b"[DONE]"
TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None)


class Runtime(Protocol):
    name: str
    kind: str  # "llama.cpp" | "upstream" | "ollama"

    async def health(self) -> bool: ...

    async def complete(self, endpoint: str, body: bytes) -> tuple[bytes, dict[str, int] | None]:
        """Answer a non-streaming request: the raw JSON response and its usage."""
        ...

    def stream(self, endpoint: str, body: bytes) -> AsyncIterator[bytes]:
        """Answer a streaming request: each event's JSON payload, the usage chunk included."""
        ...


def usage_of(chunk: bytes) -> dict[str, int] | None:
    """The usage a response or stream chunk carries, if any."""
    if b'"usage"' not in chunk:
        return None
    try:
        usage = json.loads(chunk).get("usage")
    except (ValueError, AttributeError):
        return None
    if not isinstance(usage, dict):
        return None
    return {k: v for k, v in usage.items() if isinstance(v, int)}


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
    data = json.loads(body)
    if data.get("model") == model:
        return body
    data["model"] = model
    return json.dumps(data, separators=(",", ":")).encode()


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
        upstream_model: str | None = None,
        health_url: str | None = None,
        check: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.upstream_model = upstream_model
        self.health_url = health_url or base_url.rstrip("/") + "/models"
        self._check = check or (lambda: None)
        self._client = httpx.AsyncClient(
            base_url=base_url, transport=transport, timeout=TIMEOUT,
            headers={"content-type": "application/json"},
        )

    def _body(self, body: bytes) -> bytes:
        return with_model(body, self.upstream_model) if self.upstream_model else body

    def _unreachable(self, exc: httpx.HTTPError) -> OpenAIError:
        self._check()
        return OpenAIError(503, f"runner for {self.name} is unreachable: {exc!r}", hop="node")

    async def health(self) -> bool:
        try:
            response = await self._client.get(self.health_url, timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def complete(self, endpoint: str, body: bytes) -> tuple[bytes, dict[str, int] | None]:
        self._check()
        try:
            response = await self._client.post(endpoint, content=self._body(body))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.status_code != 200:
            raise _error_of(response)
        return response.content, usage_of(response.content)

    async def stream(self, endpoint: str, body: bytes) -> AsyncIterator[bytes]:
        self._check()
        request = self._client.build_request("POST", endpoint, content=self._body(body))
        try:
            response = await self._client.send(request, stream=True)
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

