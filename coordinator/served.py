"""A request a node or cloud has started answering, as the API reads it.

`Served` is what dispatch hands the API once the first chunk arrived (see
dispatch.py): the rest of the answer (`rest`, or `batches` of chunks that arrived
together), its usage, its ledger row, and `close` to release the node. `NodeAttempt`
reads a node's tunnel stream: one wait for a burst of frames and one timer for the whole
stream (`IdleTimer`), compact token frames decoded (meshgate/token_frames.py), chunks
checked, the END frame's usage clamped and the node's speed observed; CANCEL goes to the
node when the answer did not finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from coordinator.registry import NodeConn, Registry
from meshgate.bounds import check_chunk, clamp_usage, clip
from meshgate.openai import OpenAIError
from meshgate.protocol import EnergyReport, OpenRequest, error_of
from meshgate.token_frames import MAGIC, ChunkDecoder
from tunnel import ClosedError, Frame, FrameType, Stream, TunnelError

log = logging.getLogger(__name__)
T = TypeVar("T")


def now() -> float:
    return asyncio.get_running_loop().time()


class IdleTimer:
    """Bounds each wait of one task by a limit given per wait, with one loop timer for many
    waits (``asyncio.timeout`` around each wait makes, and cancels, a timer per frame).

    A wait notes when it began and its limit; the timer, set at the first wait's end, looks
    when it fires: the task is still in a wait past that wait's end -> cancelled (the wait
    raises TimeoutError); in a wait not yet over -> set again for its end; not waiting ->
    not set again until the next wait. A limit never ends before the timer: every later
    wait begins later with the same idle bound, or ends at the same deadline."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ends: float | None = None  # the wait in progress ends then (None: no wait)
        self._expired = False

    async def wait(self, awaitable: Awaitable[T], limit: float) -> T:
        """`awaitable`'s result, or TimeoutError after `limit` seconds."""
        task = self._task = self._task or asyncio.current_task()
        assert task is not None
        ends = self._ends = self._loop.time() + limit
        if self._timer is None:
            self._timer = self._loop.call_at(ends, self._fire)
        cancelling = task.cancelling()
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._expired:
                self._expired = False
                if task.uncancel() <= cancelling:
                    raise TimeoutError from None
            raise
        finally:
            self._ends = None

    def _fire(self) -> None:
        self._timer = None
        ends = self._ends
        if ends is None or self._task is None:
            return  # not waiting: the next wait sets it again
        if self._loop.time() >= ends:
            self._expired = True
            self._task.cancel()
        else:
            self._timer = self._loop.call_at(ends, self._fire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Served:
    """A request that a node or cloud has started answering."""

    node_did: str | None = None
    upstream: str | None = None
    gathers = False
    """Whether what arrives while the writer waits queues and is read in one batch after
    (`queued`, `batches`), and `on_end` tells of the end: only then may its writes wait
    for the write tick (coordinator/write_tick.py); a cloud's stream is read a chunk a
    pull, so it never waits."""

    def __init__(self, request: OpenRequest, model: str, *, first: bytes, started: float,
                 tries: int, deadline: float, idle_timeout: float) -> None:
        self.request = request
        self.model = model
        self.first = first
        self.started = started
        self.tries = tries
        self.deadline = deadline
        self.idle_timeout = idle_timeout
        self.usage: dict[str, int] | None = None
        self.chunks = 1
        self.done = False
        self.outcome = "streaming"
        self.cost = 0.0
        self.energy = EnergyReport()  # what the node metered (END frame); clouds: not measured
        self._released = False
        self._usage_clamped = False  # `usage` is clamp_usage's already

    @property
    def released(self) -> bool:
        """Whether `close` has run (the node or cloud let go)."""
        return self._released

    @property
    def target(self) -> str:
        return self.node_did or f"cloud:{self.upstream}"

    def headers(self) -> dict[str, str]:
        if self.node_did:
            return {"x-meshgate-node": self.node_did}
        return {"x-meshgate-upstream": self.upstream or ""}

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """`headers` as an ASGI answer's (name, value) pairs."""
        if self.node_did:
            return [(b"x-meshgate-node", self.node_did.encode("latin-1"))]
        return [(b"x-meshgate-upstream", (self.upstream or "").encode("latin-1"))]

    def _wait(self) -> float:
        """Seconds the next read may take: the idle timeout, cut at the deadline."""
        left = self.deadline - now()
        if left <= 0:
            self.outcome = "deadline"
            raise OpenAIError(504, "request deadline passed while the answer was streaming",
                              code="deadline_exceeded", hop="coordinator")
        return min(left, self.idle_timeout)

    def _timed_out(self) -> OpenAIError:
        if self.deadline - now() <= 0:
            self.outcome = "deadline"
            return OpenAIError(504, "request deadline passed while the answer was streaming",
                               code="deadline_exceeded", hop="coordinator")
        self.outcome = "idle_timeout"
        return OpenAIError(504, f"{self.target} sent nothing for {self.idle_timeout:g} s "
                           "mid-response", code="stream_stalled", hop="coordinator")

    def rest(self) -> AsyncIterator[bytes]:
        raise NotImplementedError

    def queued(self) -> bool:
        """Whether more of the answer has arrived already (the first chunk need not go
        to the client alone)."""
        return False

    @property
    def ending(self) -> bool:
        """Whether the answer's last frame (its end, or an error after the chunks just
        read) has been read: what is held then leaves with the end, never on its own."""
        return self.done

    def on_end(self, wake: Callable[[], None] | None) -> None:
        """Call `wake` when the end of the answer arrives while nobody reads it (a writer
        that waits for its tick goes on at once: coordinator/write_tick.py); None: no
        longer. Here: never (a subclass that can tell overrides it)."""

    async def batches(self) -> AsyncGenerator[list[bytes], None]:
        """The chunks after the first, as lists of those that arrived together (one write
        to the client for a burst); a subclass that can see a burst overrides this."""
        async for chunk in self.rest():
            yield [chunk]

    async def collect(self) -> bytes:
        """For a non-streaming request: the whole response body."""
        parts = [self.first]
        async with contextlib.aclosing(self.batches()) as batches:
            async for batch in batches:
                parts += batch
        return b"".join(parts)

    async def close(self) -> None:
        raise NotImplementedError

    def row(self, key_id: str | None, route: str | None = None) -> dict[str, Any]:
        # a claim: never a failed insert (a node's usage was clamped when its END came)
        usage = (self.usage if self._usage_clamped else clamp_usage(self.usage)[0]) or {}
        return {
            "request_id": self.request.request_id,
            "key_id": key_id,
            "node_did": self.node_did,
            "upstream": self.upstream,
            "model": self.model,
            "endpoint": self.request.endpoint,
            "prompt_tokens": int(usage.get("prompt_tokens", 0) or 0),
            "completion_tokens": int(usage.get("completion_tokens", 0) or 0),
            "latency_ms": (time.perf_counter() - self.started) * 1000,
            "outcome": self.outcome,
            "cost": self.cost,
            "route": route,
            "joules": self.energy.joules,
            "energy_estimated": self.energy.estimated if self.energy.joules is not None else None,
            "energy_cost": self.energy.cost,
        }


class NodeAttempt(Served):
    """A request a node is answering over its tunnel stream."""

    gathers = True  # the tunnel stream queues frames; its END calls back (`on_end`)

    def __init__(self, registry: Registry, node: NodeConn, stream: Stream, request: OpenRequest,
                 model: str, *, decoder: ChunkDecoder | None = None,
                 first_at: float | None = None, **timing: Any) -> None:
        super().__init__(request, model, **timing)
        self.registry = registry
        self.node = node
        self.node_did = node.did
        self.stream = stream
        self.first_at: float | None = time.perf_counter() if first_at is None else first_at
        self.decoder = ChunkDecoder() if decoder is None else decoder

    def queued(self) -> bool:
        return self.stream.queued > 0

    @property
    def ending(self) -> bool:
        return self.done or self.outcome == "error_after_start"  # an ERROR or CANCEL read

    def on_end(self, wake: Callable[[], None] | None) -> None:
        self.stream.on_end(wake)

    async def rest(self) -> AsyncIterator[bytes]:
        """Yield the data frames after the first; set `usage` from the end frame."""
        async with contextlib.aclosing(self.batches()) as batches:
            async for batch in batches:
                for chunk in batch:
                    yield chunk

    async def batches(self) -> AsyncGenerator[list[bytes], None]:
        """The data frames after the first, each list all that had arrived when it was
        read (the tunnel coalesces a burst: one wait, one timer, one client write for it);
        sets `usage` from the end frame. An error frame ends it after the data before it."""
        stream = self.stream
        timer = IdleTimer()  # one timer for the stream, not one a wait
        try:
            while True:
                frame = stream.recv_nowait()
                if frame is None:
                    try:
                        frame = await timer.wait(stream.recv(), self._wait())
                    except TimeoutError:
                        error = self._timed_out()
                        if self.outcome == "idle_timeout":
                            self.registry.set_suspect(self.node, True)
                        raise error from None
                else:
                    self._wait()  # the deadline holds for a stream that never pauses too
                batch, end = self._drain(frame)
                if batch:
                    yield batch
                if isinstance(end, OpenAIError):
                    raise end
                if end:
                    return
        except ClosedError:
            raise self._lost() from None
        finally:
            timer.close()
            await self.close()

    def _lost(self) -> OpenAIError:
        self.outcome = "node_lost_mid_stream"
        return OpenAIError(
            502, f"node {self.node.did} disconnected mid-response; the answer is incomplete",
            code="node_lost", hop="coordinator")

    async def collect(self) -> bytes:
        """The whole body; when the rest of the answer came with its first frame (a whole
        answer and its END in one tunnel message, the usual non-stream case) it is read here
        at once, without the generator and the timer of `batches` (the same checks, usage,
        errors and release)."""
        if not self.stream.queued:
            return await super().collect()
        parts = [self.first]
        try:
            self._wait()  # the deadline, as batches checks it for a frame already queued
            batch, end = self._drain(self.stream.recv_nowait())
        except ClosedError:
            await self.close()
            raise self._lost() from None
        except BaseException:
            await self.close()
            raise
        parts += batch
        if end is True:
            await self.close()
            return b"".join(parts)
        if end:
            await self.close()
            raise end
        async with contextlib.aclosing(self.batches()) as rest:  # more to come
            async for more in rest:
                parts += more
        return b"".join(parts)

    def _drain(self, frame: Frame | None) -> tuple[list[bytes], bool | OpenAIError]:
        """`frame` and every frame queued behind it: the data, and whether the stream ended
        (True) or failed (the error to raise once the data before it went out)."""
        batch: list[bytes] = []
        while frame is not None:
            if frame.type == FrameType.DATA:
                chunks = self._checked(frame.body)
                self.chunks += len(chunks)
                batch += chunks
            elif frame.type == FrameType.END:
                self._finish(frame)
                return batch, True
            elif frame.type in (FrameType.ERROR, FrameType.CANCEL):
                self.outcome = "error_after_start"
                return batch, error_from_frame(frame)
            frame = self.stream.recv_nowait()
        return batch, False

    async def close(self) -> None:
        """Release the node; tell it to stop if the request did not finish."""
        if self._released:
            return
        self._released = True
        self.registry.release(self.node, self.model)
        if not self.done:
            if self.outcome == "streaming":
                self.outcome = "client_cancelled"
            await send_cancel(self.stream)

    def _checked(self, data: object) -> list[bytes]:
        """The chunks a DATA body stands for (a compact body: one, or a batch)."""
        try:
            if isinstance(data, bytes) and data[:1] == MAGIC:
                # rebuilt and written here as JSON objects on one line each: nothing to check
                return self.decoder.decode_many(data)
            return [check_chunk(data, streaming=self.request.stream)]
        except ValueError as exc:
            self.outcome = "bad_node_output"
            log.warning("request %s: node %s sent a bad chunk, ending the stream: %s",
                        self.request.request_id, self.node.did, exc)
            raise OpenAIError(502, f"node {short(self.node.did)} sent a malformed answer: {exc}",
                              code="bad_node_output", hop="coordinator") from None

    def _finish(self, frame: Frame) -> None:
        body = frame.body if isinstance(frame.body, dict) else {}
        self.usage, problems = clamp_usage(body.get("usage"))
        self._usage_clamped = True
        if problems:
            log.warning("request %s: node %s claimed bad usage, billed as clamped: %s",
                        self.request.request_id, self.node.did, clip("; ".join(problems)))
        self.energy = EnergyReport.from_wire(body)
        self.done = True
        self.outcome = "ok"
        self.node.served += 1
        tokens = (self.usage or {}).get("completion_tokens")
        if self.request.stream and isinstance(tokens, int) and self.first_at is not None:
            self.node.seen(self.model).finished(tokens, time.perf_counter() - self.first_at)


async def send_cancel(stream: Stream) -> None:
    if stream.closed:
        return
    with contextlib.suppress(TunnelError):
        await stream.send(FrameType.CANCEL, None)


def error_from_frame(frame: Frame) -> OpenAIError:
    if frame.type == FrameType.CANCEL:
        return OpenAIError(502, "the node cancelled the request", hop="node")
    return error_of(frame.body, hop="node", default="node reported an error")


def short(did: str) -> str:
    return did[:16] + "…" + did[-6:] if len(did) > 30 else did
