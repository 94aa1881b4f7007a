"""The one request path on the node: local or mesh, borrow, read usage once, map errors, meter once.

Three front doors hand requests here and keep only their framing: the OpenAI
routes (SSE), the Ollama routes (NDJSON) and the tunnel link (frames). For
each request the pipeline

1. decides where it runs: a model the manager serves runs here (borrowed with
   ``manager.use``, which queues while the model loads or swaps); any other,
   while the tunnel is up, goes to the coordinator through the mesh runtime;
   otherwise it is the manager's 404;
2. runs it (``complete``, ``embed`` or ``stream``);
3. reads each chunk's usage once (the usage chunk of a stream is dropped for
   a client that did not ask for it, ``stream_options.include_usage``, and
   counted all the same);
4. maps whatever the runtime raised to an :class:`~meshgate.openai.OpenAIError`
   (llama.cpp's "exceed context window" becomes 400 ``context_length_exceeded``
   with its numbers);
5. meters the request once, when it ends however it ends
   (:meth:`~node_agent.request_meter.Meter.finish`):
   the node's metrics, and any hook added with :meth:`Pipeline.on_finish`.

A stream's first chunk is awaited before the answer starts, so an error
before any token keeps its HTTP status; later errors end the stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from meshgate.openai import OpenAIError
from node_agent.metrics import NodeMetrics
from node_agent.models import ModelManager
from node_agent.request_meter import Finished, FinishHook, Meter, map_error
from node_agent.runtimes.base import Runtime, Usage, flattened, stream_batches, usage_of

__all__ = ["Answer", "FinishHook", "Finished", "MeshLookup", "Meter", "Pipeline", "Streamed",
           "map_error"]

log = logging.getLogger(__name__)

#: A model this node does not serve -> a runtime that asks the mesh for it (None: 404 here).
MeshLookup = Callable[[str], Runtime | None]

_USAGE_ONLY = b'"choices":[]'
_USAGE_KEY = b'"usage"'  # a chunk without it has none (`usage_of`)


@dataclass(slots=True)
class Answer:
    """A whole answer, while :meth:`Pipeline.answer`'s block runs."""

    data: bytes
    usage: Usage | None
    meter: Meter


def _ask(runtime: Runtime, endpoint: str, body: bytes
         ) -> Coroutine[Any, Any, tuple[bytes, Usage | None]]:
    """The runtime's coroutine for a whole answer (awaited by the caller: a coroutine
    less to make and to resume on every request)."""
    if endpoint == "embeddings":
        return runtime.embed(body)
    return runtime.complete(endpoint, body)


class Streamed:
    """A started stream: iterate it for each chunk's payload (or :meth:`batches` for lists
    of those that arrived together); :meth:`aclose` exactly once.

    The first chunk has already been read (an error before it kept its status).
    With `include_usage` False the usage-only chunk (empty ``choices``) is not
    yielded; its usage is counted all the same. With `settle_at_end` (the default)
    a stream that reaches its end closes itself before the iteration stops, so the
    request is metered before the front door sends its last bytes. An error after the start is
    raised from the iteration as an :class:`OpenAIError` (the front door frames it).
    """

    def __init__(
        self,
        first: bytes | None,
        chunks: AsyncIterator[list[bytes]],
        stack: AsyncExitStack,
        meter: Meter,
        include_usage: bool,
        *,
        pending: list[bytes] | None = None,
    ) -> None:
        self._first, self._chunks, self._stack = first, chunks, stack
        self._pending = pending or []
        """what came with the first chunk, not yet metered"""
        self.meter = meter
        self.include_usage = include_usage
        self.status = 499  # unless it reaches its end or fails
        self.settle_at_end = True
        self._closed = False
        self._released = False

    def _wanted(self, chunk: bytes, usage: Usage | None) -> bool:
        if usage is None or self.include_usage:
            return True
        return _USAGE_ONLY not in chunk  # a usage-only chunk the client did not ask for

    def _kept(self, batch: list[bytes]) -> list[bytes]:
        """`batch` metered, less what the client did not ask for."""
        meter = self.meter
        if meter.first_at is not None and _USAGE_KEY not in (  # one scan for the read (a
                batch[0] if len(batch) == 1 else b"\n".join(batch)):  # newline: no key across)
            return batch  # tokens (no usage in them): each metered as it is, all wanted
        chunk_of = meter.chunk  # a chunk without the key has no usage: only the first is
        return [c for c in batch  # metered (its time), the others wanted as they are
                if (meter.first_at is not None and _USAGE_KEY not in c)
                or self._wanted(c, chunk_of(c))]

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        return flattened(self.batches())

    async def batches(self) -> AsyncGenerator[list[bytes], None]:
        """The chunks as lists of those the runtime read together (never empty); the first
        chunk alone, first."""
        if self._first is not None:
            first, self._first = self._first, None
            if self._wanted(first, self.meter.usage):
                yield [first]
        try:
            if self._pending:
                kept, self._pending = self._kept(self._pending), []
                if kept:
                    yield kept
            async for batch in self._chunks:
                kept = self._kept(batch)
                if kept:
                    yield kept
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            error = map_error(exc, self.meter.model)
            self.status = error.status
            log.warning("stream of %s failed after it started: %s", self.meter.model,
                        error.message)
            raise error from None
        self.status = 200
        if self.settle_at_end:  # give the model back and meter before the client hears the end
            await self.aclose()

    async def release(self) -> None:
        """Stop the runtime's work if unfinished and give the model back, not yet metered
        (:meth:`aclose` meters). Once; later calls do nothing."""
        if self._released:
            return
        self._released = True
        try:
            close = getattr(self._chunks, "aclose", None)
            if close is not None:
                await close()
        finally:
            await self._stack.aclose()

    async def aclose(self, *, meter_later: bool = False) -> None:
        """End the stream: :meth:`release`, and meter (with `meter_later` in a loop callback,
        after the callbacks already due: what was queued to send leaves first). Once; later
        calls do nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.release()
        finally:
            if meter_later:
                asyncio.get_running_loop().call_soon(self.meter.finish, self.status)
            else:
                self.meter.finish(self.status)


class Pipeline:
    """The node's request path, shared by the local port's two APIs and the tunnel link."""

    def __init__(
        self,
        manager: ModelManager,
        *,
        metrics: NodeMetrics | None = None,
        mesh: MeshLookup | None = None,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.mesh = mesh
        self.hooks: list[FinishHook] = []

    def on_finish(self, hook: FinishHook) -> None:
        """Call `hook` once for every request that ends, with its :class:`Finished`."""
        self.hooks.append(hook)

    def serves(self, model: str) -> bool:
        return self.manager.serves(model)

    async def _runtime(self, model: str, stack: AsyncExitStack, local_only: bool) -> Runtime:
        far = None
        if not local_only and self.mesh is not None and not self.manager.serves(model):
            far = self.mesh(model)  # not served here: the coordinator places it elsewhere
        if far is not None:
            return far
        return await stack.enter_async_context(self.manager.use(model))

    def _where(self, model: str) -> str:
        return "local" if self.manager.serves(model) else "mesh"

    def answer(
        self, endpoint: str, model: str, body: bytes, *, via: str, local_only: bool = False,
        meter_later: bool = False,
    ) -> Answering:
        """A whole answer (``embeddings`` included), ``async with`` it; metered when the block
        ends: 200 if it ends normally, 499 if it raises (the answer did not get out) or is
        cancelled.

        With `meter_later` a block that ends normally is metered in a loop callback
        (`call_soon`), after the callbacks already due, so that what the block queued to
        send (the tunnel's write round, `Link.kick`) leaves first."""
        return Answering(self, endpoint, model, body, via=via, local_only=local_only,
                         meter_later=meter_later)

    async def complete(
        self, endpoint: str, model: str, body: bytes, *, via: str, local_only: bool = False
    ) -> tuple[bytes, Usage | None]:
        """A whole answer (``embeddings`` included) and its usage."""
        async with self.answer(endpoint, model, body, via=via, local_only=local_only) as done:
            return done.data, done.usage

    async def stream(
        self,
        endpoint: str,
        model: str,
        body: bytes,
        *,
        via: str,
        include_usage: bool = True,
        local_only: bool = False,
    ) -> Streamed:
        """A started stream (its first chunk read); the caller iterates it and closes it."""
        meter = Meter(self, model, endpoint, via, self._where(model))
        meter._streamed = True
        stack = AsyncExitStack()
        chunks: AsyncIterator[list[bytes]] | None = None
        try:
            runtime = await self._runtime(model, stack, local_only)
            chunks = stream_batches(runtime, endpoint, body)
            try:
                batch = await anext(chunks)
            except StopAsyncIteration:
                raise OpenAIError(502, f"{model} sent an empty stream", hop="runner") from None
            first = batch[0]
            meter.chunk(first)
            return Streamed(first, chunks, stack, meter, include_usage, pending=batch[1:])
        except BaseException as exc:
            if chunks is not None:
                close = getattr(chunks, "aclose", None)
                if close is not None:
                    await close()
            await stack.aclose()
            if isinstance(exc, Exception):
                error = map_error(exc, model)
                meter.finish(error.status)
                raise error from None
            meter.finish(499)
            raise


class Answering:
    """`Pipeline.answer`'s block (a class, not an ``asynccontextmanager``: no generator to
    start, hook and close on every request)."""

    __slots__ = ("_args", "_later", "_local_only", "_pipeline", "meter")

    def __init__(self, pipeline: Pipeline, endpoint: str, model: str, body: bytes, *,
                 via: str, local_only: bool, meter_later: bool) -> None:
        self._pipeline = pipeline
        self._args = (endpoint, model, body, via)
        self._local_only, self._later = local_only, meter_later
        self.meter: Meter | None = None

    async def __aenter__(self) -> Answer:
        pipeline = self._pipeline
        endpoint, model, body, via = self._args
        # its track made once the request waits for its runtime (`track_soon`)
        meter = self.meter = Meter(pipeline, model, endpoint, via, pipeline._where(model),
                                   track_soon=True)
        try:
            far = None
            if not self._local_only and pipeline.mesh is not None and not pipeline.manager.serves(
                    model):
                far = pipeline.mesh(model)  # not served here: the coordinator places it
            if far is not None:
                data, usage = await _ask(far, endpoint, body)
            else:  # borrowed only while it answers
                async with pipeline.manager.use(model) as runtime:
                    data, usage = await _ask(runtime, endpoint, body)
        except Exception as exc:  # noqa: BLE001 - every failure leaves as an OpenAI error
            error = map_error(exc, model)
            meter.finish(error.status)
            raise error from None
        except BaseException:
            meter.finish(499)
            raise
        try:
            meter.usage = usage if usage is not None else usage_of(data)  # read once
            meter.answered()  # the journal row on disk before the answer can be read
        except BaseException:
            meter.finish(499)
            raise
        return Answer(data, meter.usage, meter)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        meter = self.meter
        assert meter is not None
        if exc_type is not None:
            meter.finish(499)
        elif self._later:
            asyncio.get_running_loop().call_soon(meter.finish, 200)
        else:
            meter.finish(200)
