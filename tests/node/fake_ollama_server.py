"""A FAKE Ollama server for tests: no model, canned deterministic text.

It is a real HTTP server in its own process speaking Ollama's real API, with
the field names and shapes of Ollama's API documentation and of the
``ollama`` client's pydantic types, so the real client (and our runtime on
it) is tested against the wire protocol:

- ``GET /`` ("Ollama is running"), ``GET /api/version``, ``GET /api/tags``,
  ``GET /api/ps`` (loaded models with ``expires_at`` and ``size_vram``),
  ``POST /api/show``, ``POST /api/copy``, ``DELETE /api/delete``;
- ``POST /api/chat`` and ``POST /api/generate``: streaming NDJSON by default,
  one JSON object with ``"stream": false``; the last object has ``done``,
  ``done_reason`` ("stop", or "length" when ``options.num_predict`` cut it),
  ``prompt_eval_count`` and ``eval_count``. Empty ``messages``/``prompt``
  loads the model (``keep_alive``) and answers at once; with ``keep_alive``
  0 it unloads it (``done_reason: "unload"``), as Ollama does;
- with ``tools`` offered and the user speaking last, ``/api/chat`` answers
  with a call of the first tool (:data:`TOOL_ARGUMENTS`) and no text;
- ``POST /api/embed`` (and the legacy ``/api/embeddings``): a deterministic
  unit vector per input;
- errors as Ollama returns them: ``{"error": "..."}`` with 404 for a model it
  does not have, 400 for a bad request, an ``{"error": ...}`` line mid-stream.

The text is always the words of :data:`CANNED`, cut by ``num_predict`` or
at a ``stop`` word. Not Ollama's, for tests: ``GET /_fake/requests`` returns
the request bodies received (what a translator sent), ``GET /_fake/streams``
counts streams started, finished and cancelled (the client went away).

Run it from the repo root:

    python -m tests.node.fake_ollama_server --port 11499 \\
        --model llama3.2:latest --model nomic-embed-text:latest=embedding

Flags: ``--model NAME[=embedding]`` (repeatable; a name without a tag gets
``:latest``), ``--version``, ``--chunk-delay S``, ``--fail-after N`` (streams
send N pieces, then an error line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.node.fake_ollama_model import (
    CANNED,
    EMBED_DIM,
    FOREVER,
    TOOL_ARGUMENTS,
    FakeModel,
    OllamaError,
    canned_pieces,
    embedding,
    full_name,
    now_iso,
    parse_keep_alive,
    request_options,
    tool_calls,
    word_count,
)
from tests.node.fake_ollama_reply import Reply, load_reply, turn_text

__all__ = ["CANNED", "TOOL_ARGUMENTS", "FakeOllama", "embedding", "free_port", "parse_keep_alive",
           "running"]

REPO = Path(__file__).resolve().parents[2]


class FakeOllama:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.models: dict[str, FakeModel] = {}
        for spec in args.model or ["llama3.2:latest"]:
            name, _, capability = spec.partition("=")
            self.models[full_name(name)] = FakeModel(full_name(name), capability or "completion")
        self.loaded: dict[str, datetime] = {}
        self.requests: list[dict[str, Any]] = []
        self.streams = {"started": 0, "finished": 0, "cancelled": 0}

    # --- helpers ---------------------------------------------------------------------

    async def body(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError as exc:
            raise OllamaError(400, f"invalid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise OllamaError(400, "request body must be a JSON object")
        self.requests.append({"path": request.url.path, "body": data})
        return data

    def model(self, data: dict[str, Any]) -> FakeModel:
        name = data.get("model") or data.get("name")
        if not name:
            raise OllamaError(400, "model is required")
        if not isinstance(name, str):
            raise OllamaError(400, "model must be a string")
        model = self.models.get(full_name(name))
        if model is None:
            raise OllamaError(404, f"model '{name}' not found")
        return model

    def expire(self) -> None:
        now = datetime.now(UTC)
        for name in [n for n, t in self.loaded.items() if t <= now]:
            del self.loaded[name]

    def keep(self, model: FakeModel, keep_alive: Any) -> bool:
        """Load or unload by `keep_alive`; True if it unloaded."""
        seconds = parse_keep_alive(keep_alive)
        if seconds == 0:
            self.loaded.pop(model.name, None)
            return True
        self.loaded[model.name] = (
            FOREVER if seconds is None else datetime.now(UTC) + timedelta(seconds=seconds)
        )
        return False

    # --- routes ----------------------------------------------------------------------

    async def root(self, _: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(self, _: Request) -> Response:
        return JSONResponse({"version": self.args.version})

    async def tags(self, _: Request) -> Response:
        return JSONResponse(
            {
                "models": [
                    {
                        "name": m.name,
                        "model": m.name,
                        "modified_at": m.modified_at,
                        "size": m.size,
                        "digest": m.digest,
                        "details": m.details(),
                    }
                    for m in self.models.values()
                ]
            }
        )

    async def ps(self, _: Request) -> Response:
        self.expire()
        return JSONResponse(
            {
                "models": [
                    {
                        "name": m.name,
                        "model": m.name,
                        "size": m.size,
                        "digest": m.digest,
                        "details": m.details(),
                        "expires_at": self.loaded[m.name].isoformat().replace("+00:00", "Z"),
                        "size_vram": m.size // 2,
                        "context_length": 4096,
                    }
                    for m in self.models.values()
                    if m.name in self.loaded
                ]
            }
        )

    async def show(self, request: Request) -> Response:
        model = self.model(await self.body(request))
        family = model.family
        return JSONResponse(
            {
                "license": "fake license",
                "modelfile": f"# Modelfile generated by the fake\nFROM {model.name}\n",
                "parameters": 'stop "<|im_end|>"',
                "template": "{{ .Prompt }}",
                "details": model.details(),
                "model_info": {
                    "general.architecture": family,
                    "general.parameter_count": 135000000,
                    f"{family}.context_length": 8192,
                    f"{family}.block_count": 30,
                },
                "capabilities": [model.capability],
                "modified_at": model.modified_at,
            }
        )

    async def copy(self, request: Request) -> Response:
        data = await self.body(request)
        source = self.model({"model": data.get("source")})
        destination = data.get("destination")
        if not isinstance(destination, str) or not destination:
            raise OllamaError(400, "destination is required")
        name = full_name(destination)
        self.models[name] = FakeModel(name, source.capability, now_iso())
        return Response(status_code=200)

    async def delete(self, request: Request) -> Response:
        model = self.model(await self.body(request))
        del self.models[model.name]
        self.loaded.pop(model.name, None)
        return Response(status_code=200)

    async def chat(self, request: Request) -> Response:
        return await self.answer(request, chat=True)

    async def generate(self, request: Request) -> Response:
        return await self.answer(request, chat=False)

    async def answer(self, request: Request, *, chat: bool) -> Response:
        started = time.monotonic_ns()
        data = await self.body(request)
        model = self.model(data)
        what = "chat" if chat else "generate"
        if model.capability != "completion":
            raise OllamaError(400, f'"{model.name}" does not support {what}')
        stream = data.get("stream", True)
        if not isinstance(stream, bool):
            raise OllamaError(400, "stream must be a boolean")
        options = request_options(data)
        text, empty = turn_text(data, chat=chat)
        unloaded = self.keep(model, data.get("keep_alive"))
        if empty:  # load or unload only
            return JSONResponse(load_reply(data, model.name, chat=chat, unloaded=unloaded))
        if unloaded:  # keep_alive 0 with a prompt: answer, then unload (Ollama does too)
            self.loaded.pop(model.name, None)
        words, reason = canned_pieces(options)
        calls = tool_calls(data) if chat else []
        if calls:
            words, reason = [], "stop"
        reply = Reply(data, model.name, chat=chat, calls=calls, words=words, reason=reason,
                      prompt_tokens=max(1, word_count(text)), started=started)
        chunk, last = reply.chunk, reply.last

        if not stream:
            final = last("".join(words))
            if calls:
                final["message"]["tool_calls"] = calls
            return JSONResponse(final)

        async def lines() -> AsyncIterator[bytes]:
            self.streams["started"] += 1
            try:
                if calls:
                    yield json.dumps(chunk("", with_calls=True)).encode() + b"\n"
                for i, piece in enumerate(words):
                    if self.args.fail_after is not None and i >= self.args.fail_after:
                        yield b'{"error":"fake failure mid-stream"}\n'
                        return
                    yield json.dumps(chunk(piece)).encode() + b"\n"
                    await asyncio.sleep(self.args.chunk_delay)
                yield json.dumps(last("")).encode() + b"\n"
            except (asyncio.CancelledError, GeneratorExit):  # the client went away
                self.streams["cancelled"] += 1
                raise
            self.streams["finished"] += 1

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def embed(self, request: Request) -> Response:
        started = time.monotonic_ns()
        data = await self.body(request)
        model = self.model(data)
        inputs = data.get("input", [])
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise OllamaError(400, "invalid input type: input must be a string or strings")
        dims = data.get("dimensions") or EMBED_DIM
        if not isinstance(dims, int) or dims < 1:
            raise OllamaError(400, "dimensions must be a positive integer")
        self.keep(model, data.get("keep_alive"))
        return JSONResponse(
            {
                "model": data["model"],
                "embeddings": [embedding(i, min(dims, EMBED_DIM)) for i in inputs],
                "total_duration": time.monotonic_ns() - started,
                "load_duration": 1000,
                "prompt_eval_count": sum(max(1, word_count(i)) for i in inputs),
            }
        )

    async def embeddings(self, request: Request) -> Response:
        data = await self.body(request)
        model = self.model(data)
        prompt = data.get("prompt") or ""
        if not isinstance(prompt, str):
            raise OllamaError(400, "prompt must be a string")
        self.keep(model, data.get("keep_alive"))
        return JSONResponse({"embedding": embedding(prompt, EMBED_DIM) if prompt else []})

    async def recorded(self, _: Request) -> Response:
        return JSONResponse(self.requests)

    async def stream_counts(self, _: Request) -> Response:
        return JSONResponse(self.streams)


async def ollama_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, OllamaError)
    return JSONResponse({"error": exc.message}, status_code=exc.status)


async def not_found(_: Request, __: Exception) -> Response:
    return PlainTextResponse("404 page not found", status_code=404)


def build_app(args: argparse.Namespace) -> Starlette:
    fake = FakeOllama(args)
    return Starlette(
        routes=[
            Route("/", fake.root, methods=["GET", "HEAD"]),
            Route("/api/version", fake.version),
            Route("/api/tags", fake.tags),
            Route("/api/ps", fake.ps),
            Route("/api/show", fake.show, methods=["POST"]),
            Route("/api/copy", fake.copy, methods=["POST"]),
            Route("/api/delete", fake.delete, methods=["DELETE"]),
            Route("/api/chat", fake.chat, methods=["POST"]),
            Route("/api/generate", fake.generate, methods=["POST"]),
            Route("/api/embed", fake.embed, methods=["POST"]),
            Route("/api/embeddings", fake.embeddings, methods=["POST"]),
            Route("/_fake/requests", fake.recorded),
            Route("/_fake/streams", fake.stream_counts),
        ],
        exception_handlers={OllamaError: ollama_error, 404: not_found},
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--model", action="append", help="NAME[:TAG][=embedding], repeatable")
    parser.add_argument("--version", default="0.12.6")
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--fail-after", type=int)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    config = uvicorn.Config(
        build_app(args), host="127.0.0.1", port=args.port, log_level="warning", lifespan="off"
    )
    uvicorn.Server(config).run()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def running(*flags: str, port: int | None = None) -> Iterator[str]:
    """Run the fake in its own process on a loopback port; yields its URL."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.node.fake_ollama_server", "--port",
                             str(port), *flags], cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    try:
        while True:
            try:
                if httpx.get(f"{url}/api/version", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise RuntimeError(f"the fake Ollama exited with {proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("the fake Ollama did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main(parse_args())
