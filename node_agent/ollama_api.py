"""Ollama's API on the node's local proxy, for apps written against Ollama.

:func:`add_ollama_routes` mounts ``/api/chat``, ``/api/generate`` (streaming
NDJSON by default, one JSON object with ``"stream": false``), ``/api/embed``
and the legacy ``/api/embeddings``, ``/api/tags``, ``/api/ps``,
``/api/show``, ``/api/version`` and ``GET /`` ("Ollama is running") on the
proxy's app. They serve every model of the :class:`ModelManager`, whatever
its runtime (llama.cpp, an upstream, Ollama itself): an Ollama request is
translated to an OpenAI one, goes through the runtime's ``complete`` or
``stream``, and the answer (OpenAI JSON or SSE chunks) comes back in
Ollama's shapes, the last streamed object with ``done``, ``done_reason``,
``prompt_eval_count``, ``eval_count`` and durations in nanoseconds.

- Names: a model is found by its served name, or with ``:latest`` added or
  removed (``llama3.2`` finds ``llama3.2:latest`` and the other way round).
- ``options``: ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``typical_p``,
  ``repeat_penalty``, ``presence_penalty``, ``frequency_penalty``, ``seed``,
  ``stop`` pass by name, ``num_predict`` becomes ``max_tokens``; load-time
  options (``num_ctx``, ``num_gpu``...) are ignored. ``format`` ("json" or a
  JSON schema) becomes ``response_format``.
- ``/api/generate`` with ``raw`` is a plain completion; otherwise it is a
  chat turn (``system`` then ``prompt``), as Ollama applies the template.
  ``context`` and ``template`` are ignored.
- Empty ``messages`` or ``prompt`` loads the model (``keep_alive`` 0:
  unloads it), as Ollama does.
- ``tools`` pass through; tool calls come back as Ollama's (arguments as an
  object), streamed ones collected and sent whole before the last object.
- Model management (``/api/pull``, ``push``, ``create``, ``copy``,
  ``delete``, ``blobs``) is refused with 501; other ``/api`` paths are 404.
- Errors have Ollama's shape, ``{"error": "..."}``, with the status the
  OpenAI side had (404 for a model not served, 400 for a bad request, 503
  for a runner that cannot be reached); one that happens mid-stream is a last
  ``{"error": ...}`` line, which the ``ollama`` client raises.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Send

from meshgate.bounds import load_json
from meshgate.openai import MAX_BODY_BYTES, OpenAIError
from node_agent.inventory import read_model_file
from node_agent.metrics import NodeMetrics, RequestTrack
from node_agent.models import ModelManager
from node_agent.ollama_wire import chat_request, generate_request
from node_agent.runtimes.base import Runtime
from node_agent.streaming import WatchedResponse, aclose

log = logging.getLogger(__name__)

#: The Ollama API version these routes follow (what ``/api/version`` says).
OLLAMA_VERSION = "0.12.6"
NDJSON = "application/x-ndjson"
FOREVER = datetime(2318, 1, 1, tzinfo=UTC)
#: Ollama's model management endpoints, refused with 501 (meshgate does not pull or create).
MANAGEMENT = ("pull", "push", "create", "copy", "delete", "blobs")
DONE_REASON = {"stop": "stop", "length": "length", "tool_calls": "stop", "content_filter": "stop"}


class OllamaAPIError(Exception):
    """An error answered in Ollama's shape: ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error_response(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# --- OpenAI answer -> Ollama answer -------------------------------------------------------


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    out = []
    for c in calls or []:
        fn = c.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = {"_raw": fn.get("arguments")}
        out.append({"function": {"name": fn.get("name", ""), "arguments": args}})
    return out


class Translator:
    """OpenAI chunks (or one OpenAI answer) as Ollama's NDJSON objects, with timings."""

    def __init__(self, model: str, *, chat: bool, track: RequestTrack | None = None) -> None:
        self.model, self.chat, self.track = model, chat, track
        self.started = time.monotonic_ns()
        self.first_at: int | None = None
        self.reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.pieces = 0
        self.calls: dict[int, dict[str, str]] = {}  # streamed tool calls: index -> name, args

    def _object(self, text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": now_iso()}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
            if calls:
                out["message"]["tool_calls"] = calls
        else:
            out["response"] = text
        return out

    def chunk(self, payload: bytes) -> dict[str, Any] | None:
        """The Ollama object for one OpenAI stream chunk, if it carries text.

        Tool calls arrive in pieces (the name, then the arguments a few
        characters at a time); they are collected and sent whole by
        :meth:`tool_calls` before the last object.
        """
        data = json.loads(payload)
        if self.track is not None:
            self.track.chunk(payload)
        if isinstance(data.get("usage"), dict):
            self.usage = data["usage"]
        text = ""
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            text += delta.get("content") or choice.get("text") or ""
            for call in delta.get("tool_calls") or []:
                index = call.get("index", len(self.calls))
                slot = self.calls.setdefault(index, {"name": "", "arguments": ""})
                fn = call.get("function") or {}
                slot["name"] = slot["name"] or fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
            self.reason = choice.get("finish_reason") or self.reason
        if not text:
            return None
        self.first_at = self.first_at or time.monotonic_ns()
        self.pieces += 1
        return {**self._object(text), "done": False}

    def tool_calls(self) -> dict[str, Any] | None:
        """The object carrying the streamed tool calls, whole, if there were any."""
        if not self.calls:
            return None
        calls = [{"function": self.calls[i]} for i in sorted(self.calls)]
        return {**self._object("", _tool_calls(calls)), "done": False}

    def final(self, text: str = "", calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The last object: ``done``, ``done_reason``, token counts and durations."""
        end = time.monotonic_ns()
        first = self.first_at or end
        out = self._object(text, calls)
        out.update(
            {
                "done": True,
                "done_reason": DONE_REASON.get(self.reason or "stop", "stop"),
                "total_duration": end - self.started,
                "load_duration": 0,
                "prompt_eval_count": int(self.usage.get("prompt_tokens") or 0),
                "prompt_eval_duration": first - self.started,
                "eval_count": int(self.usage.get("completion_tokens") or self.pieces),
                "eval_duration": end - first,
            }
        )
        return out

    def whole(self, payload: bytes) -> dict[str, Any]:
        """The Ollama answer for one non-streamed OpenAI answer."""
        data = json.loads(payload)
        self.usage = data.get("usage") or {}
        choice = (data.get("choices") or [{}])[0]
        self.reason = choice.get("finish_reason")
        message = choice.get("message") or {}
        text = message.get("content") or choice.get("text") or ""
        self.first_at = self.started
        if self.track is not None:
            self.track.usage = {k: v for k, v in self.usage.items() if isinstance(v, int)}
        return self.final(text, _tool_calls(message.get("tool_calls")))

    def finish(self, status: int) -> None:
        """Record the request in the node's metrics (once; later calls do nothing)."""
        if self.track is not None:
            self.track.finish(status)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class NDJSONResponse(WatchedResponse):
    """Ollama's streaming answer: one JSON object a line."""

    def __init__(
        self, lines: AsyncIterator[bytes], stack: AsyncExitStack, translate: Translator
    ) -> None:
        super().__init__(lines, stack, media_type=NDJSON)
        self._translate = translate

    def _finished(self) -> None:
        self._translate.finish(499)  # no end sent: the client left (a no-op after the end)

    async def _pump(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async for line in self._chunks:
            await send({"type": "http.response.body", "body": line, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _ndjson(
    first: dict[str, Any] | None, chunks: AsyncIterator[bytes], translate: Translator
) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            yield _line(first)
        try:
            async for payload in chunks:
                obj = translate.chunk(payload)
                if obj is not None:
                    yield _line(obj)
        except OpenAIError as exc:
            log.warning("ollama-api stream failed after it started: %s", exc.message)
            translate.finish(exc.status)
            yield _line({"error": exc.message})
            return
        translate.finish(200)
        calls = translate.tool_calls()
        if calls is not None:
            yield _line(calls)
        yield _line(translate.final())
    finally:
        await aclose(chunks)


# --- the routes ---------------------------------------------------------------------------


def _spellings(name: str) -> tuple[str, str, str]:
    """The names an Ollama model name may be served under (``:latest`` added or dropped)."""
    return (name, f"{name}:latest", name.removesuffix(":latest"))


def resolve(manager: ModelManager, name: Any) -> str:
    """The served name an Ollama request means (``:latest`` added or dropped)."""
    if not isinstance(name, str) or not name:
        raise OllamaAPIError(400, "model is required")
    for candidate in _spellings(name):
        if manager.serves(candidate):
            return candidate
    raise OllamaAPIError(404, f"model '{name}' not found")


async def _read_json(request: Request) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise OllamaAPIError(
            413, f"request body is {declared} bytes; the limit is {MAX_BODY_BYTES}"
        )
    parts, size = [], 0
    async for part in request.stream():  # a chunked body is bounded while it is read
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise OllamaAPIError(413, f"request body exceeds the limit of {MAX_BODY_BYTES} bytes")
        parts.append(part)
    try:
        body = load_json(b"".join(parts)) if parts else {}
    except ValueError as exc:
        raise OllamaAPIError(400, f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise OllamaAPIError(400, "request body must be a JSON object")
    return body


def _keep_alive_zero(value: Any) -> bool:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value == 0
    return isinstance(value, str) and value.strip() in ("0", "0s", "0m", "0h")


class OllamaAPI:
    """The handlers, bound to one model manager."""

    def __init__(
        self,
        manager: ModelManager,
        metrics: NodeMetrics | None = None,
        mesh: Callable[[str], Runtime | None] | None = None,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.mesh = mesh  # a model not served here, asked of the coordinator (request path 1)
        self._files: dict[str, dict[str, Any]] = {}

    async def _load_or_unload(self, name: str, body: dict[str, Any], *, chat: bool) -> Response:
        unload = _keep_alive_zero(body.get("keep_alive"))
        try:
            if unload:
                await self.manager.unload(name)
            else:
                await self.manager.load(name, runtime_keep_alive=body.get("keep_alive"))
        except OpenAIError as exc:
            if not (unload and exc.status == 400):  # nothing to unload: already done
                raise OllamaAPIError(exc.status, exc.message) from None
        reply: dict[str, Any] = {"model": body["model"], "created_at": now_iso()}
        if chat:
            reply["message"] = {"role": "assistant", "content": ""}
            reply["done_reason"] = "unload" if unload else "load"
        else:
            reply["response"] = ""
            if unload:
                reply["done_reason"] = "unload"
        reply["done"] = True
        return JSONResponse(reply)

    def _far(self, model: Any) -> Runtime | None:
        """The mesh's runtime for a model this node does not serve, if the tunnel is up."""
        if self.mesh is None or not isinstance(model, str) or not model:
            return None
        if any(self.manager.serves(c) for c in _spellings(model)):
            return None
        return self.mesh(model)

    async def answer(self, request: Request, *, chat: bool) -> Response:
        body = await _read_json(request)
        far = self._far(body.get("model"))
        name = body["model"] if far is not None else resolve(self.manager, body.get("model"))
        stream = body.get("stream", True)
        if not isinstance(stream, bool):
            raise OllamaAPIError(400, "stream must be a boolean")
        if chat:
            if not body.get("messages"):
                return await self._load_or_unload(name, body, chat=True)
            endpoint, req = "chat/completions", chat_request(body, name, stream)
        else:
            if not body.get("prompt"):
                return await self._load_or_unload(name, body, chat=False)
            endpoint, req = generate_request(body, name, stream)
        raw = json.dumps(req, separators=(",", ":")).encode()
        track = self.metrics.track(name, "proxy", endpoint) if self.metrics else None
        translate = Translator(body["model"], chat=chat, track=track)
        stack = AsyncExitStack()
        try:
            runtime: Runtime = (
                far if far is not None else await stack.enter_async_context(self.manager.use(name))
            )
            if not stream:
                data, _ = await runtime.complete(endpoint, raw)
                reply = translate.whole(data)
                translate.finish(200)
                return JSONResponse(reply)
            chunks = runtime.stream(endpoint, raw)
            first: dict[str, Any] | None = None
            try:
                while first is None:  # errors before the first text keep their status
                    first = translate.chunk(await anext(chunks))
            except StopAsyncIteration:
                pass
            except BaseException:
                await aclose(chunks)
                raise
            return NDJSONResponse(_ndjson(first, chunks, translate), stack.pop_all(), translate)
        except OpenAIError as exc:
            translate.finish(exc.status)
            raise OllamaAPIError(exc.status, exc.message) from None
        finally:
            await stack.aclose()

    async def embed(self, request: Request, *, legacy: bool) -> Response:
        body = await _read_json(request)
        name = resolve(self.manager, body.get("model"))
        data = body.get("prompt" if legacy else "input")
        inputs = [data] if isinstance(data, str) else data
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise OllamaAPIError(400, "input must be a string or a list of strings")
        started = time.monotonic_ns()
        req: dict[str, Any] = {"model": name, "input": inputs, "encoding_format": "float"}
        if body.get("dimensions"):
            req["dimensions"] = body["dimensions"]
        try:
            async with self.manager.use(name) as runtime:
                raw, usage = await runtime.complete(
                    "embeddings", json.dumps(req, separators=(",", ":")).encode()
                )
        except OpenAIError as exc:
            raise OllamaAPIError(exc.status, exc.message) from None
        vectors = [
            d["embedding"] for d in sorted(json.loads(raw)["data"], key=lambda d: d["index"])
        ]
        if legacy:
            return JSONResponse({"embedding": vectors[0] if vectors else []})
        return JSONResponse(
            {
                "model": body["model"],
                "embeddings": vectors,
                "total_duration": time.monotonic_ns() - started,
                "load_duration": 0,
                "prompt_eval_count": int((usage or {}).get("prompt_tokens") or 0),
            }
        )

    # --- what is served -------------------------------------------------------------------

    def _file_info(self, path: str | None) -> dict[str, Any]:
        if not path:
            return {}
        if path not in self._files:
            try:
                f = read_model_file(Path(path))
            except OSError:
                return {}
            params = f.parameter_count
            self._files[path] = {
                "size": f.size_bytes,
                "family": f.architecture,
                "quantization": f.quantization,
                "parameter_size": _parameter_size(params) if params else "",
                "context_length": f.context_length,
                "block_count": f.block_count,
                "parameter_count": params,
                "modified_at": datetime.fromtimestamp(f.mtime_ns / 1e9, UTC)
                .isoformat()
                .replace("+00:00", "Z"),
            }
        return self._files[path]

    def describe(self, name: str) -> dict[str, Any]:
        """One served model in the shape of an ``/api/tags`` entry (plus ``_stats``)."""
        stats = self.manager.stats().get(name, {})
        runtime = self.manager.get(name)
        info = _Info(runtime.describe() if runtime is not None else None)
        file = self._file_info(stats.get("file") or stats.get("source"))
        family = (info.family if info else file.get("family")) or ""
        return {
            "name": name,
            "model": name,
            "modified_at": (info.modified_at if info else file.get("modified_at")) or now_iso(),
            "size": (info.size_bytes if info else file.get("size")) or 0,
            "digest": (info.digest if info else None) or "",
            "details": {
                "parent_model": "",
                "format": (info.format if info else None) or "gguf",
                "family": family,
                "families": [family] if family else None,
                "parameter_size": (info.parameter_size if info else file.get("parameter_size"))
                or "",
                "quantization_level": (
                    info.quantization
                    if info
                    else stats.get("quantization") or file.get("quantization")
                )
                or "",
            },
            "_stats": stats,
            "_file": file,
            "_ollama": info,
        }

    async def tags(self) -> dict[str, Any]:
        models = [self.describe(n) for n in self.manager.names()]
        return {"models": [{k: v for k, v in m.items() if not k.startswith("_")} for m in models]}

    async def ps(self) -> dict[str, Any]:
        out = []
        for name in self.manager.names():
            m = self.describe(name)
            stats, info = m["_stats"], m["_ollama"]
            if info:
                if not info.loaded:
                    continue
                expires, vram = info.expires_at, info.size_vram or 0
                context = info.context_length
            else:
                if stats.get("state", "loaded") != "loaded":
                    continue
                keep, idle = stats.get("keep_alive_s"), stats.get("idle_s")
                when = (
                    FOREVER
                    if keep is None
                    else datetime.now(UTC)
                    + timedelta(seconds=max(0.0, float(keep) - float(idle or 0.0)))
                )
                expires = when.isoformat().replace("+00:00", "Z")
                vram = int(stats.get("vram_estimate_bytes") or 0)
                context = stats.get("n_ctx") or m["_file"].get("context_length")
            size = int(stats.get("memory_estimate_bytes") or 0) + vram or m["size"]
            out.append(
                {
                    "name": name,
                    "model": name,
                    "size": size,
                    "digest": m["digest"],
                    "details": m["details"],
                    "expires_at": expires,
                    "size_vram": vram,
                    "context_length": context,
                }
            )
        return {"models": out}

    async def show(self, request: Request) -> dict[str, Any]:
        body = await _read_json(request)
        name = resolve(self.manager, body.get("model") or body.get("name"))
        m = self.describe(name)
        family, file = m["details"]["family"], m["_file"]
        info: dict[str, Any] = {"general.architecture": family}
        if file.get("parameter_count"):
            info["general.parameter_count"] = file["parameter_count"]
        if family and file.get("context_length"):
            info[f"{family}.context_length"] = file["context_length"]
        if family and file.get("block_count"):
            info[f"{family}.block_count"] = file["block_count"]
        return {
            "license": "",
            "modelfile": f"# served by meshgate\nFROM {name}\n",
            "parameters": "",
            "template": "",
            "details": m["details"],
            "model_info": info,
            "capabilities": ["completion"],
            "modified_at": m["modified_at"],
        }


class _Info:
    """A runtime's own description of its model (Ollama's list/ps entry), by attribute."""

    def __init__(self, entry: dict[str, Any] | None) -> None:
        self._entry = entry or {}

    def __bool__(self) -> bool:
        return bool(self._entry)

    def __getattr__(self, key: str) -> Any:
        return self._entry.get(key)


def _parameter_size(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}".replace(".0", "")
    return str(count)


def add_ollama_routes(
    app: FastAPI,
    manager: ModelManager,
    metrics: NodeMetrics | None = None,
    mesh: Callable[[str], Runtime | None] | None = None,
) -> None:
    """Mount Ollama's API on the proxy's `app`, serving `manager`'s models.

    With `metrics`, chat and generate requests count in the node's metrics like
    the OpenAI routes' (``via="proxy"``).
    """
    api = OllamaAPI(manager, metrics, mesh)

    def guarded(
        handler: Callable[[Request], Awaitable[Any]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            try:
                result = await handler(request)
            except (OllamaAPIError, OpenAIError) as exc:
                return _error_response(exc.status, exc.message)
            return result if isinstance(result, Response) else JSONResponse(result)

        return route

    async def root(_: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(_: Request) -> dict[str, Any]:
        return {"version": OLLAMA_VERSION}

    async def chat(request: Request) -> Response:
        return await api.answer(request, chat=True)

    async def generate(request: Request) -> Response:
        return await api.answer(request, chat=False)

    async def embed(request: Request) -> Response:
        return await api.embed(request, legacy=False)

    async def embeddings(request: Request) -> Response:
        return await api.embed(request, legacy=True)

    async def tags(_: Request) -> dict[str, Any]:
        return await api.tags()

    async def ps(_: Request) -> dict[str, Any]:
        return await api.ps()

    app.add_api_route("/", root, methods=["GET", "HEAD"], include_in_schema=False)
    for path, handler, methods in (
        ("/api/version", version, ["GET"]),
        ("/api/tags", tags, ["GET"]),
        ("/api/ps", ps, ["GET"]),
        ("/api/show", api.show, ["POST"]),
        ("/api/chat", chat, ["POST"]),
        ("/api/generate", generate, ["POST"]),
        ("/api/embed", embed, ["POST"]),
        ("/api/embeddings", embeddings, ["POST"]),
    ):
        app.add_api_route(path, guarded(handler), methods=methods, include_in_schema=False)

    async def unsupported(request: Request) -> Response:
        path = request.url.path
        if path.removeprefix("/api/").split("/")[0] in MANAGEMENT:
            return _error_response(
                501,
                f"{path} is not supported here: meshgate serves the models its node was "
                "given (add them to the node, or to the Ollama server it serves from)",
            )
        return _error_response(404, f"{path}: no such Ollama endpoint")

    app.add_api_route(
        "/api/{rest:path}",
        unsupported,
        include_in_schema=False,
        methods=["GET", "POST", "PUT", "DELETE", "HEAD"],
    )
