"""Our thin llama.cpp runner: one model, one process, one unix socket.

    python -m node_agent.runtimes.llama.worker --model PATH --uds SOCKET --name NAME

It speaks OpenAI's wire format, with the semantics the node agent relies on
and that llama-cpp-python's own server does not give:

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
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from meshgate.openai import (
    ENDPOINTS,
    SSE_DONE,
    OpenAIError,
    context_exceeded,
    model_list,
    parse_request,
    sse_error,
    sse_event,
)
from node_agent.runtimes.llama.embed import Embedder, open_embedder

log = logging.getLogger("node_agent.runtimes.llama.worker")

CHAT_KEYS = (
    "messages",
    "functions",
    "function_call",
    "tools",
    "tool_choice",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "stop",
    "seed",
    "response_format",
    "max_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
)
COMPLETION_KEYS = (
    "prompt",
    "suffix",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "logprobs",
    "echo",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "logit_bias",
)
_END = object()
_OVER_CONTEXT = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


@dataclass
class Job:
    """One request's share of the worker thread: its cancel flag and its token counts."""

    cancel: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_at_cancel: int | None = None  # completion tokens when the stop was asked
    max_tokens: int | None = None  # as the client asked (llama-cpp-python would cut it)
    param: str = "messages"  # where the prompt came from, for errors

    def stop(self) -> None:
        """Ask the worker thread to stop after the token it is on (any thread)."""
        if not self.cancel.is_set():
            self.tokens_at_cancel = self.completion_tokens
            self.cancel.set()

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


class CountingLlama(llama_cpp.Llama):
    """A Llama whose token generator counts for, and stops on, the current job."""

    job: Job | None = None

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:  # type: ignore[override]
        job = self.job or Job()
        job.prompt_tokens, job.completion_tokens = len(tokens), 0
        window = self.n_ctx()
        if job.max_tokens and len(tokens) + job.max_tokens > window:
            raise context_exceeded(window, len(tokens), job.max_tokens, param=job.param,
                                   hop="runner")
        for token in super().generate(tokens, *args, **kwargs):
            if job.cancel.is_set():
                return
            if not llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
                job.completion_tokens += 1
            yield token


def llama_kwargs(endpoint: str, body: dict[str, Any], name: str) -> dict[str, Any]:
    """The keyword arguments for the Llama call that answers `body` (pure)."""
    if body.get("n", 1) != 1:
        raise OpenAIError(400, "this runner generates one choice per request (n=1)", param="n")
    keys = CHAT_KEYS if endpoint == "chat/completions" else COMPLETION_KEYS
    kwargs = {k: body[k] for k in keys if body.get(k) is not None}
    if "max_completion_tokens" in body and "max_tokens" not in kwargs:
        kwargs["max_tokens"] = body["max_completion_tokens"]
    prompt = kwargs.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise OpenAIError(400, "'prompt' must be one string", param="prompt")
        kwargs["prompt"] = prompt[0]
    kwargs["model"] = name
    return kwargs


class Engine:
    """The single worker thread and the FIFO queue in front of it."""

    def __init__(self, llm: CountingLlama, name: str, embedder: Embedder | None = None) -> None:
        self.llm = llm
        self.name = name
        self.embedder = embedder
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self.submitted = 0  # changed on the event loop only
        self.finished = 0  # this and the rest on the worker thread only
        self.served = 0
        self.cancelled = 0
        #: The last cancelled streams: tokens generated in all, and after the stop was asked.
        self.stopped: deque[dict[str, int]] = deque(maxlen=32)

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        return self.submitted - self.finished

    def _call(self, job: Job, endpoint: str, kwargs: dict[str, Any]) -> Any:
        self.llm.job = job
        job.max_tokens = kwargs.get("max_tokens")
        job.param = "messages" if endpoint == "chat/completions" else "prompt"
        try:
            if endpoint == "chat/completions":
                return self.llm.create_chat_completion(**kwargs)
            if endpoint == "completions":
                return self.llm.create_completion(**kwargs)
            if self.embedder is None:
                raise OpenAIError(400, f"{self.name} serves no embeddings", hop="runner")
            return self.embedder.answer(kwargs)
        except (ValueError, TypeError, KeyError) as exc:
            raise self._client_error(exc, job) from None

    def _client_error(self, exc: Exception, job: Job) -> OpenAIError:
        """llama-cpp-python's refusal of a request as OpenAI's error."""
        found = _OVER_CONTEXT.search(str(exc))
        if found is None:
            return OpenAIError(400, str(exc), hop="runner")
        prompt, window = int(found.group(1)), int(found.group(2))
        return context_exceeded(window, prompt, job.max_tokens, param=job.param, hop="runner")

    async def complete(self, endpoint: str, kwargs: dict[str, Any]) -> Any:
        job = Job()
        self.submitted += 1
        try:
            return await asyncio.wrap_future(self._pool.submit(self._once, job, endpoint, kwargs))
        finally:
            job.stop()  # a caller cancelled while queued or running: stop there

    def _once(self, job: Job, endpoint: str, kwargs: dict[str, Any]) -> Any:
        try:
            if job.cancel.is_set():
                self.cancelled += 1
                raise OpenAIError(499, "client went away", hop="runner")
            result = self._call(job, endpoint, kwargs)
            self.served += 1
            return result
        finally:
            self.llm.job = None
            self.finished += 1

    def stream(self, endpoint: str, kwargs: dict[str, Any]) -> tuple[Job, asyncio.Queue[Any]]:
        """Start a streaming job; its chunks, then an exception or `_END`, arrive on the queue."""
        job, queue = Job(), asyncio.Queue[Any]()
        loop = asyncio.get_running_loop()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        self.submitted += 1
        self._pool.submit(self._produce, job, endpoint, kwargs, put)
        return job, queue

    def _produce(
        self, job: Job, endpoint: str, kwargs: dict[str, Any], put: Callable[[Any], None]
    ) -> None:
        try:
            if job.cancel.is_set():
                self.cancelled += 1
                return
            chunks = self._call(job, endpoint, {**kwargs, "stream": True})
            head: dict[str, Any] | None = None
            for chunk in chunks:
                if job.cancel.is_set():
                    chunks.close()
                    self.cancelled += 1
                    late = job.completion_tokens - (job.tokens_at_cancel or 0)
                    self.stopped.append({"tokens": job.completion_tokens, "after_stop": late})
                    log.info(
                        "generation cancelled after %d tokens (%d after the stop was asked)",
                        job.completion_tokens,
                        late,
                    )
                    return
                head = head or chunk
                put(_dumps(chunk))
            put(_dumps(self._usage_chunk(head, job)))
            self.served += 1
        except OpenAIError as exc:
            put(exc)
        except (ValueError, TypeError, KeyError) as exc:  # raised lazily, once iterating
            put(self._client_error(exc, job))
        except Exception as exc:
            log.exception("generation failed")
            put(OpenAIError(500, f"generation failed: {exc}", hop="runner"))
        finally:
            self.llm.job = None
            self.finished += 1
            put(_END)

    def _usage_chunk(self, head: dict[str, Any] | None, job: Job) -> dict[str, Any]:
        head = head or {}
        return {
            "id": head.get("id", ""),
            "object": head.get("object", "chat.completion.chunk"),
            "created": head.get("created", 0),
            "model": self.name,
            "choices": [],
            "usage": job.usage(),
        }

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.embedder is not None:
            self.embedder.close()


async def _sse(job: Job, first: bytes, queue: asyncio.Queue[Any]) -> AsyncIterator[bytes]:
    try:
        yield sse_event(first)
        while (item := await queue.get()) is not _END:
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
            return Response(_dumps(result), media_type="application/json")
        kwargs = llama_kwargs(endpoint, body, engine.name)
        if not body.get("stream"):
            result = await engine.complete(endpoint, kwargs)
            return Response(_dumps(result), media_type="application/json")
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
