"""A local Ollama server as runtimes: one :class:`OllamaRuntime` per model it has.

Everything goes through the official ``ollama`` client (``AsyncClient``):

- :class:`OllamaHost` is one Ollama server: its client, :meth:`OllamaHost.discover`
  (``list()`` merged with ``ps()``: every model it has, and which are loaded,
  until when, in how much VRAM) and :meth:`OllamaHost.sync`, which adds a
  runtime to the model manager for each model it has not seen yet.
- :class:`OllamaRuntime` speaks the :class:`~node_agent.runtime.Runtime`
  protocol: OpenAI's ``chat/completions``, ``completions`` and
  ``embeddings`` in, Ollama's ``chat``, ``generate`` (raw, as a completion
  is) and ``embed`` out, and the answers back in OpenAI's shapes, streaming
  included (role first, text deltas, a finish chunk, one usage chunk).
  Usage comes from Ollama's ``prompt_eval_count`` and ``eval_count``.
  ``load`` asks Ollama to load the model by ``keep_alive``; ``unload`` sends
  ``keep_alive=0``.

Sampling options map as Ollama's own OpenAI layer maps them: ``temperature``,
``top_p``, ``seed``, ``stop``, ``presence_penalty``, ``frequency_penalty``
keep their names, ``max_tokens`` (or ``max_completion_tokens``) becomes
``num_predict``; llama.cpp's extras ``top_k``, ``min_p``, ``typical_p`` and
``repeat_penalty`` pass too. ``response_format`` becomes ``format``.

Errors never escape as the client's exceptions: a model Ollama does not have
is a 404 ``model_not_found``, a request it refuses keeps its 4xx, an Ollama
that cannot be reached is a 503 (``hop="node"``), anything that breaks after
the answer started is a 502 (``hop="runner"``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Protocol

import httpx
import ollama
import pydantic

from meshgate.openai import OpenAIError

log = logging.getLogger(__name__)

KIND = "ollama"
TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None)

#: OpenAI (and llama.cpp) sampling fields that Ollama reads under the same name.
SAME_OPTIONS = (
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "typical_p",
    "repeat_penalty",
)
FINISH = {"stop": "stop", "length": "length"}


class _Manager(Protocol):
    def names(self) -> list[str]: ...

    def add_runtime(self, runtime: Any) -> None: ...

    async def remove(self, name: str) -> bool: ...


# --- discovery --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OllamaModel:
    """One model a local Ollama has (``list``), and whether it is loaded now (``ps``)."""

    name: str
    size_bytes: int | None = None
    digest: str | None = None
    modified_at: str | None = None
    format: str | None = None
    family: str | None = None
    parameter_size: str | None = None
    quantization: str | None = None
    loaded: bool = False
    expires_at: str | None = None
    size_vram: int | None = None
    context_length: int | None = None
    source: str = KIND

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _int(value: Any) -> int | None:
    return int(value) if value is not None else None


def merge_models(listed: ollama.ListResponse, running: ollama.ProcessResponse) -> list[OllamaModel]:
    """``list()`` and ``ps()`` as one list, sorted by name (pure)."""
    loaded = {n: m for m in running.models if (n := m.model or m.name)}
    out: dict[str, OllamaModel] = {}
    for m in listed.models:
        if not m.model:
            continue
        ps = loaded.get(m.model)
        details = m.details or (ps.details if ps else None)
        out[m.model] = OllamaModel(
            name=m.model,
            size_bytes=_int(m.size),
            digest=m.digest,
            modified_at=_iso(m.modified_at),
            format=details.format if details else None,
            family=details.family if details else None,
            parameter_size=details.parameter_size if details else None,
            quantization=details.quantization_level if details else None,
            loaded=ps is not None,
            expires_at=_iso(ps.expires_at) if ps else None,
            size_vram=_int(ps.size_vram) if ps else None,
            context_length=ps.context_length if ps else None,
        )
    for name, ps in loaded.items():  # running but not listed (a cloud or just-deleted model)
        if name not in out:
            d = ps.details
            out[name] = OllamaModel(
                name=name,
                size_bytes=_int(ps.size),
                digest=ps.digest,
                format=d.format if d else None,
                family=d.family if d else None,
                parameter_size=d.parameter_size if d else None,
                quantization=d.quantization_level if d else None,
                loaded=True,
                expires_at=_iso(ps.expires_at),
                size_vram=_int(ps.size_vram),
                context_length=ps.context_length,
            )
    return [out[n] for n in sorted(out)]


class OllamaHost:
    """One Ollama server (``http://127.0.0.1:11434`` by default) and its models."""

    def __init__(
        self, url: str = "http://127.0.0.1:11434", *, keep_alive: float | str | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.keep_alive = keep_alive
        self.client = ollama.AsyncClient(host=self.url, timeout=TIMEOUT)
        self.models: list[OllamaModel] = []
        self._ours: set[str] = set()  # names this host added to a manager

    async def discover(self) -> list[OllamaModel]:
        """Every model Ollama has, with what ``ps`` says of the loaded ones."""
        try:
            listed = await self.client.list()
            running = await self.client.ps()
        except Exception as exc:  # noqa: BLE001 - any client failure is "cannot discover"
            raise ollama_error(exc, host=self.url, name=None, model=None) from None
        self.models = merge_models(listed, running)
        return self.models

    def runtime(self, name: str, model: str | None = None) -> OllamaRuntime:
        return OllamaRuntime(name, self, model=model)

    async def sync(self, manager: _Manager) -> list[str]:
        """Discover, and add a runtime for each model the manager does not serve yet.

        Returns the names added. A model Ollama no longer has (deleted there) is
        removed from the manager: requests for it get a 404, and the coordinator
        stops sending them. An Ollama that cannot be reached changes nothing.
        """
        added = []
        served = set(manager.names())
        found = await self.discover()
        for model in found:
            if model.name not in served:
                manager.add_runtime(self.runtime(model.name))
                added.append(model.name)
                self._ours.add(model.name)
        for name in sorted(self._ours - {m.name for m in found}):
            self._ours.discard(name)
            if await manager.remove(name):
                log.info("ollama at %s: %s was deleted there; no longer serving it", self.url, name)
        return added

    async def watch(
        self,
        manager: _Manager,
        period: float = 30.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """:meth:`sync` every `period` seconds until cancelled; failures are logged, not fatal.

        `on_change` is called when a model appears or disappears, or is loaded or unloaded.
        """
        while True:
            await asyncio.sleep(period)
            before = self.state()
            try:
                added = await self.sync(manager)
            except OpenAIError as exc:
                log.warning("ollama at %s: discovery failed: %s", self.url, exc.message)
                continue
            if added:
                log.info("ollama at %s: now serving %s", self.url, added)
            if on_change is not None and self.state() != before:
                on_change()

    def state(self) -> frozenset[tuple[str, bool]]:
        """What :meth:`watch` compares: each model's name and whether it is loaded."""
        return frozenset((m.name, m.loaded) for m in self.models)

    async def aclose(self) -> None:
        await self.client.close()  # type: ignore[no-untyped-call]


# --- errors -----------------------------------------------------------------------------


def ollama_error(
    exc: BaseException, *, host: str, name: str | None, model: str | None
) -> OpenAIError:
    """Any failure of the Ollama client as an OpenAI error (pure)."""
    what = f" for {name}" if name else ""
    status, message, hop = 500, f"ollama runtime{what}: {exc!r}", "node"
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ollama.ResponseError):
        status, message, hop = exc.status_code, f"ollama: {exc.error}", "runner"
        if status == 404:
            return OpenAIError(
                404,
                f"ollama at {host} has no model '{model}' ({exc.error})",
                code="model_not_found",
                param="model",
                hop="runner",
            )
        if status == -1:  # an {"error": ...} line inside a stream
            status, message = 502, f"ollama failed mid-answer{what}: {exc.error}"
        elif not 400 <= status < 500:
            status, message = 502, f"{message} (status {status})"
    elif isinstance(exc, ConnectionError | httpx.ConnectError | httpx.ConnectTimeout):
        status, message = 503, f"ollama at {host} is unreachable{what}"
    elif isinstance(exc, httpx.TimeoutException):
        status, message, hop = 504, f"ollama at {host} timed out{what}", "runner"
    elif isinstance(exc, httpx.HTTPError | pydantic.ValidationError | ValueError):
        status, message, hop = 502, f"ollama at {host} failed{what}: {exc!r}", "runner"
    return OpenAIError(status, message[:500], hop=hop)


# --- OpenAI -> Ollama -------------------------------------------------------------------


def _bad(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, hop="node")


def options_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """Ollama ``options`` for an OpenAI request's sampling fields (pure)."""
    options = {k: body[k] for k in SAME_OPTIONS if body.get(k) is not None}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise _bad("'max_tokens' must be an integer", "max_tokens")
        options["num_predict"] = limit
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("'stop' must be a string or a list of strings", "stop")
        options["stop"] = stops
    n = body.get("n", 1)
    if n not in (1, None):
        raise _bad("the ollama runtime answers with one choice (n=1)", "n")
    return options


def format_of(body: Mapping[str, Any]) -> str | dict[str, Any] | None:
    """Ollama ``format`` for OpenAI's ``response_format`` (pure)."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return "json"
    if fmt["type"] == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            return schema
    raise _bad(f"unsupported response_format {fmt!r}", "response_format")


def _content(content: Any) -> tuple[str, list[str]]:
    """OpenAI message content (a string or parts) as Ollama's text and base64 images."""
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise _bad("message content must be a string or a list of parts", "messages")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.startswith("data:") or "," not in url:
                raise _bad("the ollama runtime takes images as data: URLs only", "messages")
            images.append(url.split(",", 1)[1])
        else:
            raise _bad(f"unsupported content part {kind!r}", "messages")
    return "".join(texts), images


def messages_of(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI chat messages as Ollama's (pure)."""
    out = []
    for m in messages:
        text, images = _content(m.get("content"))
        msg: dict[str, Any] = {"role": m["role"], "content": text}
        if images:
            msg["images"] = images
        calls = m.get("tool_calls")
        if calls:
            msg["tool_calls"] = [
                {
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": _arguments(c["function"].get("arguments")),
                    }
                }
                for c in calls
            ]
        if m["role"] == "tool" and m.get("name"):
            msg["tool_name"] = m["name"]
        out.append(msg)
    return out


def _arguments(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments or "{}")
    except (TypeError, ValueError):
        raise _bad("tool call arguments must be a JSON object", "messages") from None
    if not isinstance(parsed, dict):
        raise _bad("tool call arguments must be a JSON object", "messages")
    return parsed


def prompt_of(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("the ollama runtime takes one prompt string per request", "prompt")
    return prompt


def embed_inputs(body: Mapping[str, Any]) -> list[str]:
    data = body.get("input")
    inputs = [data] if isinstance(data, str) else data
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise _bad("the ollama runtime embeds strings only (not token arrays)", "input")
    return inputs


# --- Ollama -> OpenAI -------------------------------------------------------------------


def usage_of(
    part: ollama.ChatResponse | ollama.GenerateResponse | ollama.EmbedResponse,
) -> dict[str, int]:
    prompt = part.prompt_eval_count or 0
    completion = part.eval_count or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def tool_calls_of(message: ollama.Message, start: int = 0) -> list[dict[str, Any]]:
    """A message's tool calls in OpenAI's shape (arguments a JSON string), from index `start`."""
    return [
        {
            "index": start + i,
            "id": f"call_{uuid.uuid4().hex[:16]}",
            "type": "function",
            "function": {
                "name": c.function.name,
                "arguments": json.dumps(dict(c.function.arguments)),
            },
        }
        for i, c in enumerate(message.tool_calls or [])
    ]


def finish_of(done_reason: str | None, tool_calls: bool = False) -> str:
    if tool_calls:
        return "tool_calls"
    return FINISH.get(done_reason or "stop", "stop")


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

    async def aclose(self) -> None:
        if self._owns_host:
            await self.host.aclose()

    # --- requests ------------------------------------------------------------------------

    @staticmethod
    def _parse(body: bytes) -> dict[str, Any]:
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

    async def complete(self, endpoint: str, body: bytes) -> tuple[bytes, dict[str, int] | None]:
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
            "usage": usage_of(chat),
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
            "usage": usage_of(gen),
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
            out.append(_dumps({**self.head, "choices": [], "usage": usage_of(part)}))
        return out
