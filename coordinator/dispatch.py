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
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from coordinator.config import DispatchConfig
from coordinator.observed import first_token_timeout, requests_ahead
from coordinator.registry import NodeConn, Registry
from coordinator.scheduler import Candidate, Kind, Request, schedule
from coordinator.served import (
    IdleTimer,
    NodeAttempt,
    Served,
    error_from_frame,
    now,
    send_cancel,
    short,
)
from meshgate.bounds import check_chunk
from meshgate.openai import OpenAIError
from meshgate.protocol import OpenRequest
from meshgate.token_frames import COMPACT_BATCHES, ChunkDecoder
from tunnel import ClosedError, Frame, FrameType, Stream, TunnelError

if TYPE_CHECKING:
    from coordinator.cloud import CloudClient

log = logging.getLogger(__name__)

CLIENT_ERRORS = frozenset({400, 413, 422})  # the request itself is wrong: nobody will take it
LIMIT = 16  # candidates asked of the scheduler per decision (tries, busy nodes, clouds)
__all__ = ["CLIENT_ERRORS", "LIMIT", "Dispatcher", "Failed", "NodeAttempt", "Served",
           "error_from_frame", "now", "short", "with_model"]


class Failed(Exception):
    """A candidate failed before its first chunk; the message says why."""


def with_model(raw: bytes, model: str, asked: str | None = None) -> bytes:
    """The request body with its `model` set to the model chosen (an alias or route resolved);
    `asked`, when the caller parsed the body already, is its `model` (equal: `raw` as it is,
    no second decode)."""
    if asked == model:
        return raw
    data = json.loads(raw)
    if data.get("model") == model:
        return raw
    data["model"] = model
    return json.dumps(data, separators=(",", ":")).encode()


def timed_as(model: str, endpoint: str) -> str:
    """Under which name a node's first-token times are kept: embeddings apart from
    generation. A llama.cpp runner opens its embedding context on the first embeddings
    request (a load: node_agent/runtimes/llama/embed.py), and a chat's measured first token
    says nothing about it, so until embeddings were measured their timeout is the ceiling."""
    return model if endpoint != "embeddings" else f"{model}\x00embeddings"


class Dispatcher:
    def __init__(self, registry: Registry, config: DispatchConfig | None = None,
                 clouds: Mapping[str, CloudClient] | None = None) -> None:
        self.registry = registry
        self.config = config or DispatchConfig()
        self.clouds = dict(clouds or {})
        self.waiting = 0
        self._commands = 0
        #: Told how long each scheduling decision took (the server feeds a histogram), in a
        #: callback of the loop: a histogram's observe is not on the request's way.
        self.on_decision: Callable[[float], None] | None = None

    def knows(self, model: str) -> bool:
        """Whether a connected node or a cloud offers `model` right now."""
        return bool(self.registry.serving(model)) or any(
            model in c.upstream.models for c in self.clouds.values()
        )

    async def start(self, request: OpenRequest, want: Request, *,
                    deadline: float | None = None, asked: str | None = None) -> Served:
        """Start `request` on the best candidate that answers; see the module doc. `asked`:
        the `model` of the request's body when the caller has parsed it (saves a decode)."""
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
                if self.on_decision is not None:  # told once the request is on its way
                    asyncio.get_running_loop().call_soon(self.on_decision,
                                                         time.perf_counter() - began)
                pick, busy = self._pick(decision.candidates, tried, node_tries)
                if pick is not None:
                    tried.add((pick.kind.value, pick.target, pick.model))
                    try:
                        if pick.kind == Kind.NODE:
                            node_tries += 1
                            last = not any((c.kind.value, c.target, c.model) not in tried
                                           for c in decision.candidates)
                            return await self._try_node(pick, request, want, len(tried),
                                                        deadline, asked=asked, last=last)
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
                        deadline: float, *, asked: str | None = None,
                        last: bool = False) -> NodeAttempt:
        """`last`: no other candidate is left to fail over to, so the first token is waited
        for up to the configured timeout, not the shorter one learnt from the node's
        measured times (giving up early would only turn a slow answer into a 503)."""
        started = time.perf_counter()
        did, model = pick.target, pick.model
        node = self.registry.get(did)
        if node is None:
            raise Failed("node disconnected")
        if not node.loaded(model):
            await self._load(node, model, deadline)
        wire = request.to_wire()
        if request.stream:
            wire["compact"] = COMPACT_BATCHES  # compact token frames, batched (token_frames.py)
        wire["model"] = model
        wire["body"] = with_model(request.body, model, asked)
        view = node.view().models.get(model)  # read before acquire: its view is then stale
        self.registry.acquire(node, model)
        stream: Stream | None = None
        committed = False
        try:
            sent = time.perf_counter()
            stream = await node.mux.open(wire)
            load_s = view.load_time_s if view is not None and not view.loaded else 0.0
            ahead = requests_ahead(node.per_model.get(model, 0),
                                   view.capacity if view is not None else None)
            seen = None if last else node.observed.get(timed_as(model, request.endpoint))
            timeout = first_token_timeout(self.config.first_token_timeout_s, seen, load_s, ahead)
            # what the answer is read with, made while the node works on it (nothing made
            # here changes anything: dropped if the node fails)
            attempt = NodeAttempt(self.registry, node, stream, request, model,
                                  decoder=ChunkDecoder(), first_at=0.0, first=b"",
                                  started=started, tries=tries, deadline=deadline,
                                  idle_timeout=self.config.idle_timeout_s)
            frame = await self._first_frame(node, stream, timeout, deadline)
            if frame.type == FrameType.DATA:
                self._committed(attempt, frame, want=want, sent=sent)
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


    async def _first_frame(self, node: NodeConn, stream: Stream, limit: float,
                           deadline: float) -> Frame:
        """The stream's first frame, within `limit` s and the deadline (a node that misses
        the limit is suspect; Failed, or 504 when the deadline passed)."""
        timer = IdleTimer()  # one loop timer, set and cancelled: ~3 us warm against
        try:  # asyncio.timeout's ~9 (its context manager, reschedule and exit checks)
            return await timer.wait(stream.recv(), max(min(deadline - now(), limit), 0.0))
        except TimeoutError:
            if deadline - now() <= 0:
                raise OpenAIError(504, "request deadline passed before the first token",
                                  code="deadline_exceeded", hop="coordinator") from None
            self.registry.set_suspect(node, True)
            raise Failed(f"no first token within {limit:g} s") from None
        finally:
            timer.close()

    def _committed(self, attempt: NodeAttempt, frame: Frame, *, want: Request,
                   sent: float) -> None:
        """The first chunk arrived: check it, record the time it took, and commit."""
        request, node = attempt.request, attempt.node
        try:
            body = (attempt.decoder.decode(frame.body) if isinstance(frame.body, bytes)
                    else frame.body)
            attempt.first = check_chunk(body, streaming=request.stream)
        except ValueError as exc:
            raise Failed(f"malformed answer: {exc}") from None
        attempt.first_at = first_at = time.perf_counter()
        node.seen(timed_as(attempt.model, request.endpoint)).first_token(
            first_at - sent, want.prompt_tokens if request.stream else 0)
        self.registry.set_suspect(node, False)  # it answered in time: proven again


def _cancel_soon(stream: Stream) -> None:
    """CANCEL `stream` without waiting (it must also work while our task is cancelled)."""
    if stream.closed:
        return
    task = asyncio.get_running_loop().create_task(send_cancel(stream))
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()
