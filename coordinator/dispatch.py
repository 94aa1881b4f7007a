"""Run one request on the best candidate that answers: nodes first, then clouds.

`Dispatcher.start` asks the scheduler for ranked candidates (`schedule()` over
the registry's live index, the best few only) and tries them in the order
given: the scheduler alone ranks (policy, budget, suspects, clouds). A request is committed to a
candidate only when its first chunk arrives: until then a failure (the node
refused, its runner died, its tunnel dropped, no first token in time) sends
the request to the next candidate at once, so the client sees nothing of it.
Nodes are tried in the scheduler's order, at most `max_tries` of them; then
the clouds it ranked (cloud only when no node can take the request); then a
503 naming every failure. A node whose model has as many of our requests in flight as it
takes (its stated capacity in parallel slots, or `node_slots` running plus queued at the
node when that is more; capacity 0: never busy, an upstream pushes back itself) is busy:
when every candidate left is busy the request waits in a bounded queue (429 when the queue
is full) until a slot of one of its models frees or its deadline passes (504). The
first-token timeout follows what was measured (`observed.first_token_timeout`); a node
that misses it is suspect until it answers one in time.

After the first chunk went to the client, a failure can only end the stream:
`Served.rest` raises :class:`OpenAIError`, which the API turns into an error
event. `Served.close` releases the node and sends CANCEL when the request did
not finish (the client went away, the deadline passed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from coordinator.config import DispatchConfig
from coordinator.observed import first_token_timeout
from coordinator.registry import NodeConn, Registry
from coordinator.scheduler import Candidate, Kind, Request, schedule
from meshgate.bounds import check_chunk, clamp_usage, clip
from meshgate.openai import OpenAIError
from meshgate.protocol import EnergyReport, OpenRequest, error_of
from meshgate.token_frames import MAGIC, ChunkDecoder
from tunnel import ClosedError, Frame, FrameType, Stream, TunnelError

if TYPE_CHECKING:
    from coordinator.cloud import CloudClient

log = logging.getLogger(__name__)

CLIENT_ERRORS = frozenset({400, 413, 422})  # the request itself is wrong: nobody will take it
LIMIT = 16  # candidates asked of the scheduler per decision (tries, busy nodes, clouds)


class Failed(Exception):
    """A candidate failed before its first chunk; the message says why."""


def now() -> float:
    return asyncio.get_running_loop().time()


class Served:
    """A request that a node or cloud has started answering."""

    node_did: str | None = None
    upstream: str | None = None

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

    @property
    def target(self) -> str:
        return self.node_did or f"cloud:{self.upstream}"

    def headers(self) -> dict[str, str]:
        if self.node_did:
            return {"x-meshgate-node": self.node_did}
        return {"x-meshgate-upstream": self.upstream or ""}

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
        usage = clamp_usage(self.usage)[0] or {}  # a claim: never a failed insert
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

    def __init__(self, registry: Registry, node: NodeConn, stream: Stream, request: OpenRequest,
                 model: str, **timing: Any) -> None:
        super().__init__(request, model, **timing)
        self.registry = registry
        self.node = node
        self.node_did = node.did
        self.stream = stream
        self.first_at: float | None = time.perf_counter()
        self.decoder = ChunkDecoder()

    def queued(self) -> bool:
        return self.stream.queued > 0

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
        try:
            while True:
                frame = stream.recv_nowait()
                if frame is None:
                    try:
                        async with asyncio.timeout(self._wait()):  # no task per frame
                            frame = await stream.recv()
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
            self.outcome = "node_lost_mid_stream"
            raise OpenAIError(
                502, f"node {self.node.did} disconnected mid-response; the answer is incomplete",
                code="node_lost", hop="coordinator",
            ) from None
        finally:
            await self.close()

    def _drain(self, frame: Frame | None) -> tuple[list[bytes], bool | OpenAIError]:
        """`frame` and every frame queued behind it: the data, and whether the stream ended
        (True) or failed (the error to raise once the data before it went out)."""
        batch: list[bytes] = []
        while frame is not None:
            if frame.type == FrameType.DATA:
                self.chunks += 1
                batch.append(self._checked(frame.body))
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
            await _send_cancel(self.stream)

    def _checked(self, data: object) -> bytes:
        try:
            if isinstance(data, bytes) and data[:1] == MAGIC:
                # rebuilt and written here as one JSON object on one line: nothing to check
                return self.decoder.decode(data)
            return check_chunk(data, streaming=self.request.stream)
        except ValueError as exc:
            self.outcome = "bad_node_output"
            log.warning("request %s: node %s sent a bad chunk, ending the stream: %s",
                        self.request.request_id, self.node.did, exc)
            raise OpenAIError(502, f"node {short(self.node.did)} sent a malformed answer: {exc}",
                              code="bad_node_output", hop="coordinator") from None

    def _finish(self, frame: Frame) -> None:
        body = frame.body if isinstance(frame.body, dict) else {}
        self.usage, problems = clamp_usage(body.get("usage"))
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


async def _send_cancel(stream: Stream) -> None:
    if stream.closed:
        return
    with contextlib.suppress(TunnelError):
        await stream.send(FrameType.CANCEL, None)


def error_from_frame(frame: Frame) -> OpenAIError:
    if frame.type == FrameType.CANCEL:
        return OpenAIError(502, "the node cancelled the request", hop="node")
    return error_of(frame.body, hop="node", default="node reported an error")


def with_model(raw: bytes, model: str) -> bytes:
    """The request body with its `model` set to the model chosen (an alias or route resolved)."""
    data = json.loads(raw)
    if data.get("model") == model:
        return raw
    data["model"] = model
    return json.dumps(data, separators=(",", ":")).encode()


def short(did: str) -> str:
    return did[:16] + "…" + did[-6:] if len(did) > 30 else did


class Dispatcher:
    def __init__(self, registry: Registry, config: DispatchConfig | None = None,
                 clouds: Mapping[str, CloudClient] | None = None) -> None:
        self.registry = registry
        self.config = config or DispatchConfig()
        self.clouds = dict(clouds or {})
        self.waiting = 0
        self._commands = 0
        #: Told how long each scheduling decision took (the server feeds a histogram).
        self.on_decision: Callable[[float], None] | None = None

    def knows(self, model: str) -> bool:
        """Whether a connected node or a cloud offers `model` right now."""
        return bool(self.registry.serving(model)) or any(
            model in c.upstream.models for c in self.clouds.values()
        )

    async def start(self, request: OpenRequest, want: Request, *,
                    deadline: float | None = None) -> Served:
        """Start `request` on the best candidate that answers; see the module doc."""
        cfg = self.config
        deadline = deadline if deadline is not None else now() + cfg.deadline_s
        tried: set[tuple[str, str, str]] = set()
        failures: list[str] = []
        node_tries = 0
        queued = False
        try:
            while True:
                began = time.perf_counter()
                decision = schedule(want, self.registry.index, limit=LIMIT)
                if self.on_decision is not None:
                    self.on_decision(time.perf_counter() - began)
                pick, busy = self._pick(decision.candidates, tried, node_tries)
                if pick is not None:
                    tried.add((pick.kind.value, pick.target, pick.model))
                    try:
                        if pick.kind == Kind.NODE:
                            node_tries += 1
                            return await self._try_node(pick, request, want, len(tried),
                                                        deadline)
                        return await self.clouds[pick.target].start(
                            request, pick.model, tries=len(tried), deadline=deadline,
                            idle_timeout=cfg.idle_timeout_s)
                    except Failed as exc:
                        where = short(pick.target) if pick.kind == Kind.NODE else (
                            f"cloud {pick.target}")
                        failures.append(f"{where}: {exc}")
                        log.warning("request %s failed before its first token on %s: %s",
                                    request.request_id, pick.target, exc)
                        continue
                if not busy:
                    raise self._no_capacity(want, decision.explain(), failures)
                if not queued:
                    self._enqueue(want)
                    queued = True
                left = deadline - now()
                if left <= 0:
                    raise OpenAIError(504, "request deadline passed while waiting for a free node",
                                      code="deadline_exceeded", hop="coordinator")
                await self.registry.wait_changed(left, want.models)
        finally:
            if queued:
                self.waiting -= 1

    def _pick(self, candidates: list[Candidate], tried: set[tuple[str, str, str]],
              node_tries: int) -> tuple[Candidate | None, bool]:
        """The best candidate not tried yet that can take the request now; and whether a
        busy node was passed over."""
        busy = False
        for cand in candidates:  # in the scheduler's order: it alone ranks
            if (cand.kind.value, cand.target, cand.model) in tried:
                continue
            if cand.kind == Kind.NODE:
                conn = self.registry.get(cand.target)
                if node_tries >= self.config.max_tries or conn is None or conn.link.closed:
                    continue
                if self._full(conn, cand.model):
                    busy = True
                    continue
            elif cand.target not in self.clouds:
                continue
            return cand, busy
        return None, busy

    def _full(self, conn: NodeConn, model: str) -> bool:
        """Our requests on `model` fill what the node takes: its stated capacity (parallel
        slots), or `node_slots` (running plus queued at the node) when that is more or
        nothing is stated; capacity 0 (an upstream we do not cap) is never full."""
        view = conn.view().models.get(model)
        stated = view.capacity if view is not None else None
        if stated == 0:
            return False
        limit = max(stated or 0, self.config.node_slots)
        return conn.per_model.get(model, 0) >= limit

    def _enqueue(self, want: Request) -> None:
        if self.waiting >= self.config.queue_size:
            raise OpenAIError(
                429, f"every node that serves {'/'.join(want.models)} is busy and the queue is "
                f"full ({self.config.queue_size} waiting); retry later",
                code="queue_full", hop="coordinator")
        self.waiting += 1

    async def _load(self, node: NodeConn, model: str, deadline: float) -> None:
        """Demand-driven placement: the node has `model` but not loaded; COMMAND it to load
        and wait (until the deadline) for its RESULT. Requests for the same model on the same
        node share one load."""
        pending = node.loading.get(model)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            node.loading[model] = pending
            task = asyncio.get_running_loop().create_task(self._command_load(node, model, pending))
            _background.add(task)
            task.add_done_callback(_background.discard)
        try:
            await asyncio.wait_for(asyncio.shield(pending), max(deadline - now(), 0.0))
        except TimeoutError:
            raise OpenAIError(504, f"request deadline passed while {short(node.did)} loaded "
                              f"{model}", code="deadline_exceeded", hop="coordinator") from None
        except ConnectionError as exc:
            raise Failed(f"could not load {model}: {exc}") from None

    async def _command_load(self, node: NodeConn, model: str,
                            pending: asyncio.Future[None]) -> None:
        self._commands += 1
        command_id = f"load-{self._commands}"
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        node.results[command_id] = waiter
        log.info("placing %s on %s: commanding it to load", model, node.did)
        try:
            await node.mux.send_control(FrameType.COMMAND,
                                        {"op": "load", "model": model, "id": command_id})
            result = await waiter
            if result.get("ok"):
                log.info("%s loaded %s", node.did, model)
                pending.set_result(None)
            else:
                raw = result.get("error")
                error: dict[str, Any] = raw if isinstance(raw, dict) else {}
                reason = str(error.get("message") or "the node refused")
                log.warning("%s could not load %s: %s", node.did, model, reason)
                pending.set_exception(ConnectionError(reason))
        except (TunnelError, ConnectionError) as exc:
            if not pending.done():
                pending.set_exception(ConnectionError(str(exc) or "node disconnected"))
        finally:
            node.results.pop(command_id, None)
            if node.loading.get(model) is pending:
                del node.loading[model]
            if pending.done() and not pending.cancelled():
                pending.exception()  # mark retrieved; the waiters re-raise it themselves

    def _no_capacity(self, want: Request, explain: str, failures: list[str]) -> OpenAIError:
        models = "/".join(want.models)
        if failures:
            message = f"every candidate for {models} failed: " + "; ".join(failures)
        elif explain:
            message = f"no node or cloud can serve {models} right now: {explain}"
        else:
            message = f"no connected node or cloud serves {models} right now"
        return OpenAIError(503, message, code="no_capacity", hop="coordinator")

    async def _try_node(self, pick: Candidate, request: OpenRequest, want: Request, tries: int,
                        deadline: float) -> NodeAttempt:
        started = time.perf_counter()
        did, model = pick.target, pick.model
        node = self.registry.get(did)
        if node is None:
            raise Failed("node disconnected")
        if not node.loaded(model):
            await self._load(node, model, deadline)
        wire = request.to_wire()
        if request.stream:
            wire["compact"] = 1  # the node may send compact token frames (token_frames.py)
        wire["model"] = model
        wire["body"] = with_model(request.body, model)
        self.registry.acquire(node, model)
        stream: Stream | None = None
        committed = False
        try:
            sent = time.perf_counter()
            stream = await node.mux.open(wire)
            view = node.view().models.get(model)
            load_s = view.load_time_s if view is not None and not view.loaded else 0.0
            timeout = first_token_timeout(self.config.first_token_timeout_s,
                                          node.observed.get(model), load_s)
            wait = min(deadline - now(), timeout)
            try:
                async with asyncio.timeout(max(wait, 0.0)):
                    frame = await stream.recv()
            except TimeoutError:
                if deadline - now() <= 0:
                    raise OpenAIError(504, "request deadline passed before the first token",
                                      code="deadline_exceeded", hop="coordinator") from None
                self.registry.set_suspect(node, True)
                raise Failed(f"no first token within {timeout:g} s") from None
            if frame.type == FrameType.DATA:
                attempt = self._committed(node, stream, frame, request, want=want,
                                          model=model, started=started, sent=sent, tries=tries,
                                          deadline=deadline)
                committed = True
                return attempt
            if frame.type == FrameType.ERROR:
                error = error_from_frame(frame)
                if error.status in CLIENT_ERRORS:
                    raise error
                raise Failed(error.message)
            raise Failed(f"unexpected {frame.type.name} frame before data")
        except ClosedError:
            raise Failed("tunnel closed") from None
        finally:
            if not committed:
                self.registry.release(node, model)
                if stream is not None:
                    _cancel_soon(stream)


    def _committed(self, node: NodeConn, stream: Stream, frame: Frame, request: OpenRequest,
                   *, want: Request, model: str, started: float, sent: float, tries: int,
                   deadline: float) -> NodeAttempt:
        """The first chunk arrived: check it, record the time it took, and commit."""
        decoder = ChunkDecoder()
        try:
            body = decoder.decode(frame.body) if isinstance(frame.body, bytes) else frame.body
            first = check_chunk(body, streaming=request.stream)
        except ValueError as exc:
            raise Failed(f"malformed answer: {exc}") from None
        first_at = time.perf_counter()
        node.seen(model).first_token(first_at - sent, want.prompt_tokens if request.stream else 0)
        self.registry.set_suspect(node, False)  # it answered in time: proven again
        attempt = NodeAttempt(self.registry, node, stream, request, model, first=first,
                              started=started, tries=tries, deadline=deadline,
                              idle_timeout=self.config.idle_timeout_s)
        attempt.decoder = decoder
        attempt.first_at = first_at
        return attempt


def _cancel_soon(stream: Stream) -> None:
    """CANCEL `stream` without waiting (it must also work while our task is cancelled)."""
    if stream.closed:
        return
    task = asyncio.get_running_loop().create_task(_send_cancel(stream))
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()
