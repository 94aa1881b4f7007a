"""The one interface every runtime speaks, and a named fake that speaks it.

A runtime answers OpenAI requests for one model on this box (or, for the
mesh runtime, through the coordinator). Bodies go in as the request's JSON
bytes (a :class:`Body` when the front door has decoded them: read the object
with :func:`decoded` rather than decoding again) and come out as bytes: a
whole answer from :meth:`Runtime.complete` and :meth:`Runtime.embed`, each chunk's
JSON payload from :meth:`Runtime.stream`
(the usage chunk included: the pipeline reads usage once per chunk and drops
that chunk for clients that did not ask for it). Every failure is an
:class:`~meshgate.openai.OpenAIError`.

:meth:`Runtime.load` and :meth:`Runtime.unload` are called by the
:class:`~node_agent.models.ModelManager` only; what they do depends on the
runtime (start and stop a supervised process, ask Ollama by ``keep_alive``,
nothing for a server that is not ours). Nothing outside ``runtimes/`` picks
behaviour by a runtime's class: the manager and the pipeline use this
interface and the runtime's ``kind`` label only for reporting.

:class:`FakeRuntime` is a stand-in, named as one, for tests and benchmarks
that need an instant runtime: it answers in OpenAI's exact shapes, streams a
set number of chunks and records what it was asked.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Protocol

import msgspec

from meshgate.openai import OpenAIError

__all__ = ["Body", "FakeRuntime", "RunnerError", "Runtime", "Usage", "decoded", "flattened",
           "stream_batches", "usage_of"]

Usage = dict[str, int]


class Body(bytes):
    """A request's JSON bytes carrying the object they were decoded to (or encoded from),
    so that a runtime that needs the object (Ollama's) does not decode them again: a body
    is decoded once per process. Anything that needs only bytes sees bytes."""

    data: dict[str, Any]

    def __new__(cls, raw: bytes, data: dict[str, Any]) -> Body:
        body = super().__new__(cls, raw)
        body.data = data
        return body


def decoded(body: bytes) -> dict[str, Any] | None:
    """The object a :class:`Body` carries; None for plain bytes (decode them yourself)."""
    return body.data if isinstance(body, Body) else None


class Runtime(Protocol):
    name: str
    kind: str  # "llama.cpp" | "upstream" | "ollama" | "mesh" | "fake": for reports only

    async def health(self) -> bool:
        """Whether the runtime answers now."""
        ...

    async def load(self, keep_alive: float | str | None = None) -> None:
        """Make the model ready to answer (the ModelManager's call only)."""
        ...

    async def unload(self) -> None:
        """Release what the model holds (the ModelManager's call only)."""
        ...

    async def complete(self, endpoint: str, body: bytes) -> tuple[bytes, Usage | None]:
        """Answer a non-streaming request: the raw JSON response and its usage."""
        ...

    def stream(self, endpoint: str, body: bytes) -> AsyncIterator[bytes]:
        """Answer a streaming request: each chunk's JSON payload, the usage chunk included."""
        ...

    async def embed(self, body: bytes) -> tuple[bytes, Usage | None]:
        """Answer ``/v1/embeddings``: the raw JSON response and its usage."""
        ...

    async def aclose(self) -> None:
        """Let go of connections and clients (not of the model: that is unload)."""
        ...

    def describe(self) -> dict[str, Any] | None:
        """What the runtime itself knows of its model (Ollama: its list/ps entry), or None."""
        ...


def stream_batches(runtime: Runtime, endpoint: str, body: bytes
                   ) -> AsyncIterator[list[bytes]]:
    """`runtime`'s streamed chunks as lists of those that arrived together (never empty):
    its own ``stream_batches`` when it can tell (one read of its server), else one a list."""
    own: Callable[[str, bytes], AsyncIterator[list[bytes]]] | None = getattr(
        runtime, "stream_batches", None)
    return own(endpoint, body) if own is not None else _singles(runtime.stream(endpoint, body))


async def flattened(batches: AsyncGenerator[list[bytes], None]) -> AsyncGenerator[bytes, None]:
    """`batches`' chunks one by one (for a caller that wants single chunks); closed with it,
    so the runtime stops its work."""
    try:
        async for batch in batches:
            for chunk in batch:
                yield chunk
    finally:
        await batches.aclose()


async def _singles(chunks: AsyncIterator[bytes]) -> AsyncGenerator[list[bytes], None]:
    try:
        async for chunk in chunks:
            yield [chunk]
    finally:  # closed with it: the runtime stops its work
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


class RunnerError(Exception):
    """A runner process that would not start."""


_DECODER = json.JSONDecoder()
#: A usage object of token counts only (the usual one), checked in C: any other value (a
#: nested map, a float, a bool, not JSON) fails it and `_usage_at` reads it as before.
_COUNTS = msgspec.json.Decoder(dict[str, int])
_USAGE_KEY = b'"usage"'
_SPACE = b" \t\r\n"


def usage_of(chunk: bytes) -> Usage | None:
    """The usage a response or stream chunk carries, if any (one scan, cheap for chunks).

    Only the ``usage`` object is decoded, not the whole answer: its key is found from the
    end (OpenAI-compatible servers put it last; a quote inside a JSON string is escaped,
    so ``"usage"`` followed by a colon is a key, never text), so a long answer costs a
    scan in C instead of a parse."""
    end = len(chunk)
    while (at := chunk.rfind(_USAGE_KEY, 0, end)) >= 0:
        end = at
        pos = at + len(_USAGE_KEY)
        while pos < len(chunk) and chunk[pos] in _SPACE:
            pos += 1
        if pos >= len(chunk) or chunk[pos] != 0x3A:  # ':'; else a string "usage", not the key
            continue
        return _usage_at(chunk, pos + 1)
    return None


def _usage_at(chunk: bytes, start: int) -> Usage | None:
    """The usage whose value begins at `start`: its integer fields (None: not a map)."""
    last = len(chunk.rstrip(_SPACE)) - 1
    if last > start and chunk[last] == 0x7D:  # '}': the usual answer, its usage last in it
        try:  # the value alone, if it is one map of integers (msgspec: strict, in C)
            return _COUNTS.decode(chunk[start:last])
        except ValueError:  # msgspec's errors included: read as below, which decides
            pass
    try:  # from an ASCII byte on: valid UTF-8 if the chunk is
        usage, _ = _DECODER.raw_decode(chunk[start:].decode().lstrip())
    except ValueError:  # UnicodeDecodeError included
        return None
    if not isinstance(usage, dict):
        return None
    return {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)}


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


class FakeRuntime:
    """A stand-in runtime (kind ``fake``): instant answers in OpenAI's shapes.

    `chunks` text chunks per stream (``"tok0 "``, ``"tok1 "``...), then a
    finish chunk and the usage chunk. `delay` seconds between chunks. `fail`
    makes every request raise that error. `calls` records ``(endpoint, body)``;
    ``loaded`` follows load/unload; ``cancelled`` counts streams closed early.
    """

    kind = "fake"

    def __init__(
        self,
        name: str = "fake",
        *,
        chunks: int = 4,
        delay: float = 0.0,
        fail: OpenAIError | None = None,
        n_ctx: int = 2048,
    ) -> None:
        self.name = name
        self.chunks, self.delay, self.fail, self.n_ctx = chunks, delay, fail, n_ctx
        self.calls: list[tuple[str, bytes]] = []
        self.loaded = True
        self.closed = False
        self.cancelled = 0

    def _check(self, endpoint: str, body: bytes) -> dict[str, Any]:
        self.calls.append((endpoint, body))
        if self.fail is not None:
            raise self.fail
        if not self.loaded:
            raise OpenAIError(503, f"{self.name} is not loaded", hop="runner")
        try:
            data = json.loads(body)
        except ValueError:
            raise OpenAIError(400, "request body is not valid JSON", hop="runner") from None
        return data if isinstance(data, dict) else {}

    def _prompt_tokens(self, data: dict[str, Any]) -> int:
        text = json.dumps(data.get("messages") or data.get("prompt") or data.get("input") or "")
        tokens = max(1, len(text) // 4)
        if tokens > self.n_ctx:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {self.n_ctx} tokens. However, "
                f"your messages resulted in {tokens} tokens.",
                code="context_length_exceeded",
                param="messages",
                hop="runner",
            )
        return tokens

    def _limit(self, data: dict[str, Any]) -> int:
        limit = data.get("max_completion_tokens", data.get("max_tokens"))
        return min(self.chunks, limit) if isinstance(limit, int) else self.chunks

    async def health(self) -> bool:
        return not self.closed

    async def load(self, keep_alive: float | str | None = None) -> None:
        self.loaded = True

    async def unload(self) -> None:
        self.loaded = False

    async def complete(self, endpoint: str, body: bytes) -> tuple[bytes, Usage | None]:
        if endpoint == "embeddings":
            return await self.embed(body)
        data = self._check(endpoint, body)
        n = self._limit(data)
        usage = self._usage(self._prompt_tokens(data), n)
        text = "".join(f"tok{i} " for i in range(n))
        finish = "length" if n < self.chunks else "stop"
        chat = endpoint == "chat/completions"
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        reply = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-fake",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": data.get("model", self.name),
            "choices": [choice],
            "usage": usage,
        }
        return _dumps(reply), usage

    @staticmethod
    def _usage(prompt: int, completion: int) -> Usage:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def stream(self, endpoint: str, body: bytes) -> AsyncIterator[bytes]:
        data = self._check(endpoint, body)
        prompt, n = self._prompt_tokens(data), self._limit(data)
        chat = endpoint == "chat/completions"
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-fake",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": data.get("model", self.name),
        }

        def chunk(text: str | None, finish: str | None) -> bytes:
            part: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                part["delta"] = {} if text is None else {"content": text}
            else:
                part["text"] = text or ""
            return _dumps({**head, "choices": [part]})

        done = False
        try:
            for i in range(n):
                if self.delay:
                    await asyncio.sleep(self.delay)
                yield chunk(f"tok{i} ", None)
            yield chunk(None, "length" if n < self.chunks else "stop")
            yield _dumps({**head, "choices": [], "usage": self._usage(prompt, n)})
            done = True
        finally:
            if not done:
                self.cancelled += 1

    async def embed(self, body: bytes) -> tuple[bytes, Usage | None]:
        data = self._check("embeddings", body)
        given = data.get("input")
        inputs = [given] if isinstance(given, str) else list(given or [])
        prompt = sum(max(1, len(str(i)) // 4) for i in inputs)
        usage = {"prompt_tokens": prompt, "total_tokens": prompt}
        vectors = [
            {"object": "embedding", "index": i, "embedding": [float(len(str(x))), 1.0, 0.0]}
            for i, x in enumerate(inputs)
        ]
        reply = {"object": "list", "model": data.get("model", self.name), "data": vectors,
                 "usage": usage}
        return _dumps(reply), usage

    async def aclose(self) -> None:
        self.closed = True

    def describe(self) -> dict[str, Any] | None:
        return None
