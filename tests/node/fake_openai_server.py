"""A FAKE OpenAI-compatible server for tests: no model, canned answers.

It speaks the real wire format (``/health``, ``/v1/models``,
``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``, streaming as SSE with a
final usage chunk and ``[DONE]``) so supervisors and runtimes are tested
against a real process, the way llama-swap tests with its simple-responder.
Misbehaviour on cue, by flag::

    --start-delay S     sleep S seconds before serving
    --ignore-sigterm    ignore SIGTERM once serving (only SIGKILL stops it)
    --crash-after S     exit with --exit-code S seconds after serving starts
    --crash-file PATH   exit with --exit-code as soon as PATH exists
    --fail-start        exit with --exit-code before serving
    --chunks N          content chunks per answer (each one word)
    --chunk-delay S     pause between chunks

    python tests/node/fake_openai_server.py --uds /tmp/x.sock --name fake
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uds")
    parser.add_argument("--port", type=int)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--crash-after", type=float)
    parser.add_argument("--crash-file")
    parser.add_argument("--fail-start", action="store_true")
    parser.add_argument("--exit-code", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    return parser.parse_args(argv)


def build_app(args: argparse.Namespace) -> Starlette:
    words = [f"w{i}" for i in range(args.chunks)]
    usage = {"prompt_tokens": 7, "completion_tokens": len(words),
             "total_tokens": 7 + len(words)}

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok", "model": args.name, "pid": os.getpid()})

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": args.name, "object": "model", "created": 0, "owned_by": "fake"}]})

    async def answer(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": {"message": "bad json", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=400)
        chat = request.url.path.endswith("chat/completions")
        if body.get("model") == "error-please":
            return JSONResponse({"error": {"message": "fake runner refuses", "type": "x",
                                           "param": None, "code": "refused"}}, status_code=422)
        if body.get("stream"):
            return StreamingResponse(stream(chat, body), media_type="text/event-stream")
        text = " ".join(words)
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            if chat else {"index": 0, "text": text, "finish_reason": "stop"}
        )
        return JSONResponse({"id": "fake-1", "object": "chat.completion" if chat else
                             "text_completion", "created": 0, "model": body.get("model"),
                             "choices": [choice], "usage": usage})

    async def embeddings(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": {"message": "bad json", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=400)
        given = body.get("input")
        inputs = [given] if isinstance(given, str) else list(given or [])
        data = [{"object": "embedding", "index": i, "embedding": [float(len(str(x))), 0.5]}
                for i, x in enumerate(inputs)]
        tokens = sum(len(str(x).split()) for x in inputs)
        return JSONResponse({"object": "list", "model": body.get("model"), "data": data,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def stream(chat: bool, body: dict[str, Any]) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        for word in words:
            choice = {"index": 0, "delta": {"content": word + " "}} if chat else {
                "index": 0, "text": word + " "}
            chunk = {"id": "fake-1", "object": kind, "created": 0, "model": body.get("model"),
                     "choices": [choice]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            await asyncio.sleep(args.chunk_delay)
        last = {"id": "fake-1", "object": kind, "choices": [], "usage": usage}
        yield f"data: {json.dumps(last)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return Starlette(routes=[
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", answer, methods=["POST"]),
        Route("/v1/completions", answer, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
    ])


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, args: argparse.Namespace) -> None:
        super().__init__(config)
        self.args = args

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.args.ignore_sigterm:  # after uvicorn installed its own handler
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        threading.Thread(target=crash_on_cue, args=(self.args,), daemon=True).start()


def crash_on_cue(args: argparse.Namespace) -> None:
    started = time.monotonic()
    while True:
        if args.crash_after is not None and time.monotonic() - started >= args.crash_after:
            os._exit(args.exit_code)
        if args.crash_file and Path(args.crash_file).exists():
            os._exit(args.exit_code)
        time.sleep(0.02)


def main(args: argparse.Namespace) -> None:
    time.sleep(args.start_delay)  # before the socket exists, like a model loading
    if args.fail_start:
        raise SystemExit(args.exit_code)
    config = uvicorn.Config(build_app(args), uds=args.uds, port=args.port or 8000,
                            log_level="warning", lifespan="off")
    Server(config, args).run()


if __name__ == "__main__":
    main(parse_args())
