"""Ollama's API on the node's local port, for apps written against Ollama: framing only.

:func:`ollama_routes` serves ``/api/chat``, ``/api/generate`` (streaming
NDJSON by default, one JSON object with ``"stream": false``), ``/api/embed``
and the legacy ``/api/embeddings``, ``/api/tags``, ``/api/ps``,
``/api/show``, ``/api/version`` and ``GET /`` ("Ollama is running"). Every
model the node serves answers, whatever its runtime, and models it does not
serve go to the mesh as on the OpenAI routes: an Ollama request becomes an
OpenAI one (:mod:`node_agent.ollama_wire`), runs through the
:class:`~node_agent.pipeline.Pipeline`, and the answer comes back in
Ollama's shapes (:mod:`node_agent.ollama_ndjson`).

- Names: a model is found by its served name, or with ``:latest`` added or
  removed (``llama3.2`` finds ``llama3.2:latest`` and the other way round).
- ``/api/generate`` with ``raw`` is a plain completion; otherwise it is a
  chat turn (``system`` then ``prompt``), as Ollama applies the template.
- Empty ``messages`` or ``prompt`` loads the model (``keep_alive`` 0:
  unloads it), through the model manager, as Ollama does.
- Model management (``/api/pull``, ``push``, ``create``, ``copy``,
  ``delete``, ``blobs``) is refused with 501; other ``/api`` paths are 404.
- Errors have Ollama's shape, ``{"error": "..."}``, with the status the
  OpenAI side had; one that happens mid-stream is a last ``{"error": ...}``
  line, which the ``ollama`` client raises.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from meshgate.bounds import load_json
from meshgate.openai import OpenAIError
from node_agent.http import WatchedResponse, json_response, note, noted_close, read_body
from node_agent.ollama_catalog import Catalog
from node_agent.ollama_ndjson import Translator, line, now_iso
from node_agent.ollama_wire import chat_request, generate_request
from node_agent.pipeline import Pipeline, Streamed
from node_agent.runtimes.base import Body

__all__ = ["OLLAMA_VERSION", "ollama_routes"]

log = logging.getLogger(__name__)

#: The Ollama API version these routes follow (what ``/api/version`` says).
OLLAMA_VERSION = "0.12.6"
NDJSON = "application/x-ndjson"
#: Ollama's model management endpoints, refused with 501 (meshgate does not pull or create).
MANAGEMENT = ("pull", "push", "create", "copy", "delete", "blobs")


def _error(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


def _spellings(name: str) -> tuple[str, str, str]:
    """The names an Ollama model name may be served under (``:latest`` added or dropped)."""
    return (name, f"{name}:latest", name.removesuffix(":latest"))


def _keep_alive_zero(value: Any) -> bool:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value == 0
    return isinstance(value, str) and value.strip() in ("0", "0s", "0m", "0h")


async def _read_json(request: Request) -> dict[str, Any]:
    raw = await read_body(request)  # a chunked body is bounded while it is read
    try:
        body = load_json(raw) if raw else {}
    except ValueError as exc:  # bad JSON, or nested too deeply
        raise OpenAIError(400, f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "request body must be a JSON object")
    return body


async def _ndjson(
    first: dict[str, Any] | None, parts: AsyncGenerator[bytes, None], translate: Translator
) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            yield line(first)
        try:
            async for payload in parts:
                obj = translate.chunk(payload)
                if obj is not None:
                    yield line(obj)
        except OpenAIError as exc:
            yield line({"error": exc.message})
            return
        calls = translate.tool_calls()
        if calls is not None:
            yield line(calls)
        yield line(translate.final())
    finally:
        await parts.aclose()


class OllamaAPI:
    """The handlers, bound to one pipeline."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.manager = pipeline.manager
        self.catalog = Catalog(pipeline.manager)

    def resolve(self, name: Any, *, mesh: bool = False) -> str:
        """The served name an Ollama request means; with `mesh`, any name the mesh may have."""
        if not isinstance(name, str) or not name:
            raise OpenAIError(400, "model is required", param="model")
        for candidate in _spellings(name):
            if self.manager.serves(candidate):
                return candidate
        if mesh and self.pipeline.mesh is not None and self.pipeline.mesh(name) is not None:
            return name  # not served here: the coordinator places it
        raise OpenAIError(404, f"model '{name}' not found", param="model")

    async def _load_or_unload(self, name: str, body: dict[str, Any], *, chat: bool) -> Response:
        unload = _keep_alive_zero(body.get("keep_alive"))
        try:
            if unload:
                await self.manager.unload(name)
            else:
                await self.manager.load(name, runtime_keep_alive=body.get("keep_alive"))
        except OpenAIError as exc:
            if not (unload and exc.status == 400):  # nothing to unload: already done
                raise
        reply: dict[str, Any] = {"model": body["model"], "created_at": now_iso()}
        if chat:
            reply["message"] = {"role": "assistant", "content": ""}
            reply["done_reason"] = "unload" if unload else "load"
        else:
            reply["response"] = ""
            if unload:
                reply["done_reason"] = "unload"
        reply["done"] = True
        return json_response(reply)

    async def answer(self, request: Request, *, chat: bool) -> Response:
        body = await _read_json(request)
        name = self.resolve(body.get("model"), mesh=True)
        note(request.scope, name)
        stream = body.get("stream", True)
        if not isinstance(stream, bool):
            raise OpenAIError(400, "stream must be a boolean", param="stream")
        if chat:
            if not body.get("messages"):
                return await self._load_or_unload(name, body, chat=True)
            endpoint, req = "chat/completions", chat_request(body, name, stream)
        else:
            if not body.get("prompt"):
                return await self._load_or_unload(name, body, chat=False)
            endpoint, req = generate_request(body, name, stream)
        raw = Body(json.dumps(req, separators=(",", ":")).encode(), req)
        translate = Translator(body["model"], chat=chat)
        if not stream:
            data, usage = await self.pipeline.complete(endpoint, name, raw, via="proxy")
            note(request.scope, name, usage)
            return json_response(translate.whole(data))
        streamed = await self.pipeline.stream(endpoint, name, raw, via="proxy")
        return await self._streamed(request, streamed, translate)

    @staticmethod
    async def _streamed(request: Request, streamed: Streamed, translate: Translator) -> Response:
        parts = streamed.__aiter__()
        first: dict[str, Any] | None = None
        try:
            while first is None:  # errors before the first text keep their status
                first = translate.chunk(await anext(parts))
        except StopAsyncIteration:
            pass
        except BaseException:
            await parts.aclose()
            await streamed.aclose()
            raise
        return WatchedResponse(_ndjson(first, parts, translate),
                               noted_close(request.scope, streamed), media_type=NDJSON)

    async def embed(self, request: Request, *, legacy: bool) -> Response:
        body = await _read_json(request)
        name = self.resolve(body.get("model"))
        note(request.scope, name)
        data = body.get("prompt" if legacy else "input")
        inputs = [data] if isinstance(data, str) else data
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise OpenAIError(400, "input must be a string or a list of strings", param="input")
        started = time.monotonic_ns()
        req: dict[str, Any] = {"model": name, "input": inputs, "encoding_format": "float"}
        if body.get("dimensions"):
            req["dimensions"] = body["dimensions"]
        raw, usage = await self.pipeline.complete(
            "embeddings", name, Body(json.dumps(req, separators=(",", ":")).encode(), req),
            via="proxy",
        )
        note(request.scope, name, usage)
        vectors = [
            d["embedding"] for d in sorted(json.loads(raw)["data"], key=lambda d: d["index"])
        ]
        if legacy:
            return json_response({"embedding": vectors[0] if vectors else []})
        return json_response(
            {
                "model": body["model"],
                "embeddings": vectors,
                "total_duration": time.monotonic_ns() - started,
                "load_duration": 0,
                "prompt_eval_count": int((usage or {}).get("prompt_tokens") or 0),
            }
        )

    async def show(self, request: Request) -> Response:
        body = await _read_json(request)
        return json_response(self.catalog.show(self.resolve(body.get("model") or body.get("name"))))


def ollama_routes(pipeline: Pipeline) -> list[BaseRoute]:
    """The routes of Ollama's API, serving `pipeline`'s models."""
    api = OllamaAPI(pipeline)

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return _error(exc.status, exc.message)

        return route

    async def root(_: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(_: Request) -> Response:
        return json_response({"version": OLLAMA_VERSION})

    async def chat(request: Request) -> Response:
        return await api.answer(request, chat=True)

    async def generate(request: Request) -> Response:
        return await api.answer(request, chat=False)

    async def embed(request: Request) -> Response:
        return await api.embed(request, legacy=False)

    async def embeddings(request: Request) -> Response:
        return await api.embed(request, legacy=True)

    async def tags(_: Request) -> Response:
        return json_response(api.catalog.tags())

    async def ps(_: Request) -> Response:
        return json_response(api.catalog.ps())

    async def unsupported(request: Request) -> Response:
        path = request.url.path
        if path.removeprefix("/api/").split("/")[0] in MANAGEMENT:
            return _error(
                501,
                f"{path} is not supported here: meshgate serves the models its node was "
                "given (add them to the node, or to the Ollama server it serves from)",
            )
        return _error(404, f"{path}: no such Ollama endpoint")

    routes: list[BaseRoute] = [Route("/", root, methods=["GET", "HEAD"])]
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
        routes.append(Route(path, guarded(handler), methods=methods))
    routes.append(
        Route("/api/{rest:path}", unsupported, methods=["GET", "POST", "PUT", "DELETE", "HEAD"])
    )
    return routes
