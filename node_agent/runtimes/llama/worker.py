"""Our thin llama.cpp runner: one model, one process, one unix socket.

    python -m node_agent.runtimes.llama.worker --model PATH --uds SOCKET --name NAME

This file is its HTTP face; engine.py is its llama.cpp side. It speaks OpenAI's
wire format, with the semantics the node agent relies on and that
llama-cpp-python's own server does not give:

- requests run one at a time, in arrival order, on a single thread; a new
  request waits its turn and never interrupts the one running;
- a stream is SSE ending with a usage chunk (``choices: []``, like OpenAI's
  ``stream_options.include_usage``) and then ``data: [DONE]``; its counts are
  the ones llama-cpp-python reports for the same request without streaming
  (prompt tokens as evaluated, sampled tokens short of the end-of-generation
  token), taken by counting what ``Llama.generate`` hands out;
- a client that goes away stops generation within one token;
- a request the context cannot hold (prompt plus ``max_tokens``) is OpenAI's
  400 ``context_length_exceeded`` with the real counts, never a completion
  silently cut short;
- ``/v1/embeddings`` works for every model: a second context for them opens
  on the first request (``embed.py``);
- errors are OpenAI error objects with ``hop: runner``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import llama_cpp
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from meshgate.openai import (
    ENDPOINTS,
    SSE_DONE,
    OpenAIError,
    model_list,
    parse_request,
    sse_error,
    sse_event,
)
from node_agent.runtimes.llama.embed import Embedder, open_embedder
from node_agent.runtimes.llama.engine import END, CountingLlama, Engine, Job, dumps, llama_kwargs

log = logging.getLogger("node_agent.runtimes.llama.worker")


async def _sse(job: Job, first: bytes, queue: asyncio.Queue[Any]) -> AsyncIterator[bytes]:
    try:
        yield sse_event(first)
        while (item := await queue.get()) is not END:
            if isinstance(item, OpenAIError):
                yield sse_error(item)
                return
            yield sse_event(item)
        yield SSE_DONE
    finally:
        job.stop()


def build_app(engine: Engine) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    async def openai_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, OpenAIError)
        return JSONResponse(exc.body(), status_code=exc.status)

    app.add_exception_handler(OpenAIError, openai_error)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": engine.name,
            "pid": os.getpid(),
            "pending": engine.pending,
            "served": engine.served,
            "cancelled": engine.cancelled,
            "stopped": list(engine.stopped),
            "n_ctx": engine.llm.n_ctx(),
            "embeddings_open": engine.embedder is not None and engine.embedder.llm is not None,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return model_list([engine.name], owned_by="meshgate-runner")

    async def answer(request: Request, endpoint: str) -> Response:
        try:
            body = parse_request(await request.body(), endpoint)
        except OpenAIError as exc:
            exc.hop = "runner"
            raise
        if endpoint == "embeddings":
            result = await engine.complete(endpoint, body)
            return Response(dumps(result), media_type="application/json")
        kwargs = llama_kwargs(endpoint, body, engine.name)
        if not body.get("stream"):
            result = await engine.complete(endpoint, kwargs)
            return Response(dumps(result), media_type="application/json")
        job, queue = engine.stream(endpoint, kwargs)
        try:
            first = await queue.get()
        except asyncio.CancelledError:
            job.stop()
            raise
        if isinstance(first, OpenAIError):
            raise first
        return StreamingResponse(_sse(job, first, queue), media_type="text/event-stream")

    def route(endpoint: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            return await answer(request, endpoint)

        return handler

    for endpoint in ENDPOINTS:
        app.add_api_route(f"/v1/{endpoint}", route(endpoint), methods=["POST"])
    return app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m node_agent.runtimes.llama.worker")
    parser.add_argument("--model", required=True, help="path of the .gguf file")
    parser.add_argument("--uds", required=True, help="unix socket to serve on")
    parser.add_argument("--name", required=True, help="model name to report")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--n-threads", type=int, default=None)
    parser.add_argument("--embed-n-ctx", type=int, default=512,
                        help="longest embeddings input in tokens (memory grows ~0.4 MiB a token)")
    parser.add_argument("--embedding", action="store_true",
                        help="open the embeddings context at start (default: on first use)")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def exit_with_parent(period: float = 1.0) -> None:
    """Exit when the daemon that started us is gone (killed with SIGKILL, crashed).

    Runners live in their own session so that a signal to the daemon's group does
    not reach them mid-request; the cost is that nothing else would stop them when
    the daemon dies without its shutdown. Re-parenting is how we notice.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        log.warning("the node daemon (pid %d) is gone: exiting", parent)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def without_extra_buffer_types() -> None:
    """Load weights into plain CPU buffers, not ggml's "extra" (AMX/repacked) ones.

    On hosts whose CPUID advertises AMX but whose hypervisor does not run it (the
    Firecracker VMs we test on), ggml's AMX matmul dies with SIGILL on the first
    batch of more than one token: the runner vanishes mid-request. Plain buffers
    use AVX2/AVX-512 and work everywhere. ``MESHGATE_LLAMA_EXTRA_BUFTS=1`` keeps
    ggml's default. (llama-cpp-python has no argument for it, so the default
    params it reads are patched in this one-model process.)
    """
    if os.environ.get("MESHGATE_LLAMA_EXTRA_BUFTS") == "1":
        return
    lowlevel = llama_cpp.llama_cpp
    default = lowlevel.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = False
        return p

    lowlevel.llama_model_default_params = params


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    exit_with_parent()
    without_extra_buffer_types()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    llm = CountingLlama(
        model_path=args.model,
        n_ctx=args.n_ctx,
        n_gpu_layers=args.n_gpu_layers,
        n_threads=args.n_threads,
        verbose=False,
    )
    log.info("loaded %s from %s (n_ctx=%d)", args.name, args.model, llm.n_ctx())
    embedder = Embedder(args.name, lambda: open_embedder(
        args.model, n_ctx=min(args.embed_n_ctx, llm.n_ctx()), n_gpu_layers=args.n_gpu_layers,
        n_threads=args.n_threads))
    if args.embedding:
        embedder.open()
    engine = Engine(llm, args.name, embedder)
    config = uvicorn.Config(
        build_app(engine),
        uds=args.uds,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
