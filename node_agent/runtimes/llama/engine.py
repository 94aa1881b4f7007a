"""The llama.cpp side of the runner: one model on one thread, requests in arrival order.

`Engine` owns the `Llama` (a `CountingLlama`, which counts and stops on the current
`Job`), runs whole answers and streams on its single worker thread, turns
llama-cpp-python's over-context failure into OpenAI's 400 ``context_length_exceeded``,
and opens the embeddings context on first use. The HTTP face is worker.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from meshgate.openai import (
    OpenAIError,
    context_exceeded,
)
from node_agent.runtimes.llama.embed import Embedder

log = logging.getLogger("node_agent.runtimes.llama.engine")

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
END = object()
_OVER_CONTEXT = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


def dumps(data: Any) -> bytes:
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
        """Start a streaming job; its chunks, then an exception or `END`, arrive on the queue."""
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
                put(dumps(chunk))
            put(dumps(self._usage_chunk(head, job)))
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
            put(END)

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
