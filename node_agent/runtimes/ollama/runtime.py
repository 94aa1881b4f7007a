"""One model of a local Ollama as a :class:`~node_agent.runtimes.base.Runtime`.

:class:`OllamaRuntime` takes OpenAI's ``chat/completions``, ``completions``
and ``embeddings`` and calls Ollama's ``chat``, ``generate`` (raw, as a
completion is) and ``embed`` through the official ``ollama`` client; the
answers come back in OpenAI's shapes, streaming included (role first, text
deltas, a finish chunk, one usage chunk). Usage comes from Ollama's
``prompt_eval_count`` and ``eval_count``. ``load`` asks Ollama to load the
model by ``keep_alive``; ``unload`` sends ``keep_alive=0``. The mapping
itself is :mod:`node_agent.ollama_wire`'s (one option table).
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import ollama

from meshgate.openai import OpenAIError
from node_agent.ollama_wire import (
    embed_inputs,
    finish_of,
    format_of,
    messages_of,
    ollama_usage,
    options_of,
    prompt_of,
    tool_calls_of,
)
from node_agent.runtimes.base import Usage, decoded
from node_agent.runtimes.ollama.host import KIND, OllamaHost, ollama_error

log = logging.getLogger(__name__)


def _bad(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, hop="node")


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _floats_b64(vector: Sequence[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


class OllamaRuntime:
    """One model of a local Ollama, served as `name` (by default, Ollama's own name)."""

    kind = KIND

    def __init__(
        self,
        name: str,
        host: OllamaHost | str,
        *,
        model: str | None = None,
        keep_alive: float | str | None = None,
    ) -> None:
        self.name = name
        self.model = model or name
        self.host = host if isinstance(host, OllamaHost) else OllamaHost(host)
        self._owns_host = not isinstance(host, OllamaHost)
        self.keep_alive = keep_alive if keep_alive is not None else self.host.keep_alive

    @property
    def client(self) -> ollama.AsyncClient:
        return self.host.client

    def _error(self, exc: BaseException) -> OpenAIError:
        return ollama_error(exc, host=self.host.url, name=self.name, model=self.model)

    # --- lifecycle -----------------------------------------------------------------------

    async def health(self) -> bool:
        """Ollama answers and still has this model."""
        try:
            listed = await self.client.list()
        except Exception:  # noqa: BLE001 - unhealthy, whatever the reason
            return False
        return any(m.model == self.model for m in listed.models)

    async def load(self, keep_alive: float | str | None = None) -> None:
        """Have Ollama load the model now and keep it for `keep_alive` (its default: 5m)."""
        try:
            await self.client.generate(model=self.model, keep_alive=keep_alive or self.keep_alive)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc) from None

    async def unload(self) -> None:
        """Have Ollama unload the model now (``keep_alive=0``)."""
        try:
            await self.client.generate(model=self.model, keep_alive=0)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc) from None

    def describe(self) -> dict[str, Any] | None:
        """Ollama's own entry for the model (``list`` merged with ``ps``), once discovered."""
        found = next((m for m in self.host.models if m.name == self.model), None)
        return found.to_dict() if found is not None else None

    async def aclose(self) -> None:
        if self._owns_host:
            await self.host.aclose()

    # --- requests ------------------------------------------------------------------------

    @staticmethod
    def _parse(body: bytes) -> dict[str, Any]:
        known = decoded(body)  # the front door decoded it already
        if known is not None:
            return known
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad(f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise _bad("request body must be a JSON object")
        return data

    def _chat_args(self, data: dict[str, Any]) -> dict[str, Any]:
        messages = data.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m for m in messages
        ):
            raise _bad("'messages' must be a list of objects with a 'role'", "messages")
        args: dict[str, Any] = {
            "model": self.model,
            "messages": messages_of(messages),
            "options": options_of(data),
            "format": format_of(data),
            "keep_alive": self.keep_alive,
        }
        if data.get("tools"):
            args["tools"] = data["tools"]
        return args

    def _generate_args(self, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": prompt_of(data),
            "suffix": data.get("suffix"),
            "raw": True,
            "options": options_of(data),
            "format": format_of(data),
            "keep_alive": self.keep_alive,
        }

    async def embed(self, body: bytes) -> tuple[bytes, Usage | None]:
        return await self.complete("embeddings", body)

    async def complete(self, endpoint: str, body: bytes) -> tuple[bytes, Usage | None]:
        data = self._parse(body)
        try:
            if endpoint == "chat/completions":
                chat = await self.client.chat(**self._chat_args(data), stream=False)
                reply = self._chat_reply(chat)
            elif endpoint == "completions":
                gen = await self.client.generate(**self._generate_args(data), stream=False)
                reply = self._completion_reply(gen)
            elif endpoint == "embeddings":
                reply = await self._embeddings(data)
            else:
                raise OpenAIError(
                    404, f"the ollama runtime does not serve /v1/{endpoint}", hop="node"
                )
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error
            raise self._error(exc) from None
        usage: dict[str, int] = reply["usage"]
        return _dumps(reply), usage

    def _chat_reply(self, chat: ollama.ChatResponse) -> dict[str, Any]:
        calls = tool_calls_of(chat.message)
        message: dict[str, Any] = {"role": "assistant", "content": chat.message.content or ""}
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish_of(chat.done_reason, bool(calls)),
                }
            ],
            "usage": ollama_usage(chat),
        }

    def _completion_reply(self, gen: ollama.GenerateResponse) -> dict[str, Any]:
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "text": gen.response or "",
                    "logprobs": None,
                    "finish_reason": finish_of(gen.done_reason),
                }
            ],
            "usage": ollama_usage(gen),
        }

    async def _embeddings(self, data: dict[str, Any]) -> dict[str, Any]:
        inputs = embed_inputs(data)
        encoding = data.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        dims = data.get("dimensions")
        reply = await self.client.embed(
            model=self.model, input=inputs, dimensions=dims, keep_alive=self.keep_alive
        )
        prompt = reply.prompt_eval_count or 0
        return {
            "object": "list",
            "model": self.name,
            "data": [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": _floats_b64(v) if encoding == "base64" else list(v),
                }
                for i, v in enumerate(reply.embeddings)
            ],
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }

    async def stream(self, endpoint: str, body: bytes) -> AsyncIterator[bytes]:
        data = self._parse(body)
        if endpoint not in ("chat/completions", "completions"):
            raise _bad(f"/v1/{endpoint} does not stream")
        chat = endpoint == "chat/completions"
        parts: AsyncIterator[ollama.ChatResponse] | AsyncIterator[ollama.GenerateResponse]
        try:
            if chat:
                parts = await self.client.chat(**self._chat_args(data), stream=True)
            else:
                parts = await self.client.generate(**self._generate_args(data), stream=True)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc) from None
        chunks = _Chunks(self.name, chat=chat)
        try:
            async for part in parts:
                for payload in chunks.of(part):
                    yield payload
                if part.done:
                    return
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc) from None
        finally:
            aclose = getattr(parts, "aclose", None)
            if aclose is not None:
                await aclose()
        raise OpenAIError(
            502, f"ollama ended the answer for {self.name} before it was done", hop="runner"
        )


class _Chunks:
    """Ollama stream parts as OpenAI chunk payloads: role first, deltas, finish, usage."""

    def __init__(self, name: str, *, chat: bool) -> None:
        self.chat = chat
        self.first = True
        self.calls = 0  # tool calls sent so far
        self.head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": name,
        }

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        return _dumps({**self.head, "choices": [{"index": 0, "logprobs": None, **choice}]})

    def of(self, part: ollama.ChatResponse | ollama.GenerateResponse) -> list[bytes]:
        out = []
        if isinstance(part, ollama.ChatResponse):
            calls = tool_calls_of(part.message, start=self.calls)
            self.calls += len(calls)
            delta: dict[str, Any] = {"role": "assistant"} if self.first else {}
            if part.message.content:
                delta["content"] = part.message.content
            if calls:
                delta["tool_calls"] = calls
            if part.message.content or calls or not part.done or self.first:
                out.append(self._chunk({"delta": delta, "finish_reason": None}))
        elif part.response:
            out.append(self._chunk({"text": part.response, "finish_reason": None}))
        self.first = False
        if part.done:
            end: dict[str, Any] = {"delta": {}} if self.chat else {"text": ""}
            out.append(
                self._chunk({**end, "finish_reason": finish_of(part.done_reason, self.calls > 0)})
            )
            out.append(_dumps({**self.head, "choices": [], "usage": ollama_usage(part)}))
        return out
