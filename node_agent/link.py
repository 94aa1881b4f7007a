"""The node's side of the tunnel: stay connected, serve the coordinator's requests.

One long-lived task: connect (fresh handshake and ephemeral keys every try),
announce the inventory, send telemetry on a period, and run each request the
coordinator opens as its own task. A lost connection is retried with
full-jitter exponential backoff; a refusal (401/403: revoked, unknown) is
final and ends the loop with the coordinator's reason in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import time
from collections.abc import Callable, Mapping
from typing import Any

from meshgate.logs import quick_info
from meshgate.node_messages import DELTA_COALESCE_S, ModelLoad
from meshgate.openai import OpenAIError
from meshgate.protocol import OpenRequest, ProtocolViolation, error_body
from meshgate.token_frames import COMPACT_BATCHES, ChunkEncoder
from node_agent.journal import UsageJournal
from node_agent.journal_upload import upload_journal
from node_agent.metrics import NodeMetrics
from node_agent.models import ModelManager
from node_agent.pipeline import Pipeline
from node_agent.report import LoadDeltas, clean_runtime, with_load_now
from node_agent.runtimes.mesh import MeshRuntime
from node_agent.state import Enrollment
from tunnel import (
    ClosedError,
    Frame,
    FrameType,
    Identity,
    Mux,
    RefusedError,
    Stream,
    TunnelError,
    backoff,
    connect,
    until_cancelled,
)

log = logging.getLogger(__name__)

STABLE_AFTER_S = 60.0


class CoordinatorLink:
    def __init__(
        self,
        identity: Identity,
        enrollment: Enrollment,
        manager: ModelManager,
        *,
        telemetry: Callable[[], dict[str, Any] | None] | None = None,
        telemetry_period: float = 2.0,
        inventory: Callable[[], dict[str, Any]] | None = None,
        metrics: NodeMetrics | None = None,
        journal: UsageJournal | None = None,
        pipeline: Pipeline | None = None,
        load_state: Callable[[], Mapping[str, ModelLoad]] | None = None,
    ) -> None:
        self.identity = identity
        self.journal = journal  # usage served while disconnected, uploaded on each connect
        self.metrics = metrics
        self.pipeline = pipeline or Pipeline(manager, metrics=metrics)
        self.enrollment = enrollment
        self.manager = manager
        self.telemetry = telemetry
        self.telemetry_period = telemetry_period
        self._inventory = inventory
        self._load_state = load_state  # what changed in it goes up within DELTA_COALESCE_S
        self._deltas = LoadDeltas()
        self._inventory_dirty = asyncio.Event()
        self.inventories_sent = 0
        self.connected = asyncio.Event()
        self.refused: RefusedError | None = None
        self._commands: set[asyncio.Task[None]] = set()
        self._mux: Mux | None = None
        self._stopping = False
        #: A cluster's member list (accept map, `{"op": "members"}`): node_agent/members.py.
        self.on_members: Callable[[Any], None] | None = None

    async def run(self) -> None:
        """Keep the link up until cancelled or refused."""
        delays = backoff()
        while True:
            started = time.monotonic()
            try:
                await self._session()
            except RefusedError as exc:
                self.refused = exc
                log.error("coordinator refused this node, not retrying: %s", exc.reason)
                return
            except (TunnelError, OSError) as exc:
                if not self._stopping:
                    log.warning("tunnel to %s lost: %s", self.enrollment.url, exc)
            finally:
                self.connected.clear()
            if self._stopping:
                return
            if time.monotonic() - started > STABLE_AFTER_S:
                delays = backoff()
            delay = next(delays)
            log.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        link = await connect(
            self.enrollment.url,
            self.identity,
            self.enrollment.coordinator_key,
            info={"host": platform.node(), "version": "0.1.0"},
        )
        if self.on_members is not None and link.accept:
            self.on_members(link.accept.get("members"))
        mux = Mux(link, initiator=True, on_stream=self._serve)
        mux.on_control = lambda frame: self._control(mux, frame)
        self._mux = mux
        log.info("connected to coordinator %s as %s", self.enrollment.url, self.identity.did)
        self._inventory_dirty.clear()
        await self._send_inventory(mux)
        self.connected.set()
        heartbeat = asyncio.create_task(self._heartbeat(mux))
        upload = asyncio.create_task(upload_journal(self.journal, mux)) if self.journal else None
        try:
            await mux.run()
        finally:
            heartbeat.cancel()
            if upload is not None:
                upload.cancel()
            for command in list(self._commands):
                command.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await link.close()
        raise ClosedError("coordinator closed the tunnel")

    def mesh_runtime(self, model: str) -> MeshRuntime | None:
        """A runtime that asks the coordinator for `model`, while the tunnel is up."""
        if self._mux is None or not self.connected.is_set():
            return None
        return MeshRuntime(model, self._current_mux)

    def _current_mux(self) -> Mux | None:
        return self._mux if self.connected.is_set() else None

    async def drain(self, grace: float) -> None:
        """Stopping: GOAWAY (the coordinator sends nothing new here), let the requests in
        flight finish for up to `grace` seconds, close the tunnel."""
        self._stopping = True
        mux, self._mux = self._mux, None
        if mux is not None and self.connected.is_set():
            log.info("draining the tunnel (up to %g s)", grace)
            with contextlib.suppress(TunnelError, OSError, TimeoutError):
                await asyncio.wait_for(mux.shutdown("node stopping", grace), grace + 5)
            log.info("tunnel drained")

    def inventory(self) -> dict[str, Any]:
        """The INVENTORY body: ``models`` served here (names or maps with a ``name``), files."""
        if self._inventory is not None:
            return self._inventory()
        return {"models": self.manager.names()}

    def inventory_changed(self) -> None:
        """The inventory changed: send it again now if connected (else on the next connect)."""
        self._inventory_dirty.set()

    async def _send_inventory(self, mux: Mux) -> None:
        await mux.send_control(FrameType.INVENTORY, self.inventory())
        self.inventories_sent += 1

    def _telemetry_body(self) -> dict[str, Any]:
        sample = self.telemetry() if self.telemetry else None
        body: dict[str, Any] = dict(sample) if sample else {"runtime": self.manager.stats()}
        body.setdefault("ts", time.time())
        runtime = body.get("runtime")  # only what the protocol accepts (a stats error is not)
        body["runtime"] = clean_runtime(runtime) if isinstance(runtime, dict) else {}
        if self._load_state is not None:  # the load as it is now, and deltas go on from it
            state = self._load_state()
            with_load_now(body["runtime"], state)
            self._deltas.reported({n: state[n] for n in body["runtime"] if n in state})
        return body

    async def _heartbeat(self, mux: Mux) -> None:
        """Telemetry every period; the inventory again as soon as it changes; load deltas
        (in flight, queued, loaded) at most every DELTA_COALESCE_S when they changed."""
        due = time.monotonic()
        while True:
            if self._inventory_dirty.is_set():
                self._inventory_dirty.clear()
                await self._send_inventory(mux)
            if time.monotonic() >= due:
                await mux.send_control(FrameType.TELEMETRY, self._telemetry_body())
                due = time.monotonic() + self.telemetry_period
            elif self._load_state is not None and (
                    delta := self._deltas.delta(self._load_state())) is not None:
                await mux.send_control(FrameType.TELEMETRY, delta)
            with contextlib.suppress(TimeoutError):
                wait = max(0.0, due - time.monotonic())
                if self._load_state is not None:
                    wait = min(wait, DELTA_COALESCE_S)
                await asyncio.wait_for(self._inventory_dirty.wait(), wait)

    async def _control(self, mux: Mux, frame: Frame) -> None:
        """A COMMAND runs as its own task so that a long swap holds up no other frame."""
        if frame.type != FrameType.COMMAND:
            return
        if isinstance(frame.body, dict) and frame.body.get("op") == "members":
            if self.on_members is not None:
                self.on_members(frame.body.get("members"))
            return
        task = asyncio.create_task(self._command(mux, frame.body))
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _command(self, mux: Mux, body: Any) -> None:
        """Run ``{"op": "load"|"unload"|"swap", "id": ..., ...}``; answer with a RESULT frame:
        ``{"id", "op", "ok": true, "result": {...}}`` or ``{"id", "op", "ok": false, "error"}``."""
        head = {k: body.get(k) for k in ("id", "op")} if isinstance(body, dict) else {}
        log.info("command from the coordinator: %s", body)
        try:
            reply = {**head, "ok": True, "result": await self.manager.command(body)}
            self.inventory_changed()
        except OpenAIError as exc:
            log.warning("command %s failed: %s", head, exc.message)
            error = error_body(exc.status, exc.message, code=exc.code, hop=exc.hop or "node",
                               param=exc.param)
            reply = {**head, "ok": False, "error": error}
        with contextlib.suppress(TunnelError):
            await mux.send_control(FrameType.RESULT, reply)

    async def _serve(self, stream: Stream, frame: Frame) -> None:
        """Run one request; stop generating if the coordinator cancels it."""
        if await until_cancelled(stream, answer(self.pipeline, stream, frame)):
            log.info("stream %s cancelled by the coordinator", stream.id)


async def answer(pipeline: Pipeline, stream: Stream, frame: Frame) -> None:
    """Answer one OPEN frame on `stream` through `pipeline`: DATA frames, then END with the
    usage (and the request's energy), or ERROR. Only local runtimes answer (a request from
    the coordinator never goes back up the tunnel)."""
    try:
        request = OpenRequest.from_wire(frame.body)
    except ProtocolViolation as exc:
        await stream.send(FrameType.ERROR, error_body(400, str(exc)))
        return
    # the request's line is written in a loop callback: once this task waits for the
    # runtime (the upstream's answer), not before the request has gone to it
    asyncio.get_running_loop().call_soon(
        quick_info, log, "request %s: %s %s", request.request_id, request.endpoint,
        request.model)
    args = (request.endpoint, request.model, request.body)
    try:
        if request.stream:
            streamed = await pipeline.stream(*args, via="tunnel", local_only=True)
            streamed.settle_at_end = False  # the END frame carries the energy, read before
            # compact token frames when the coordinator asks (meshgate/token_frames.py); in
            # batches (the chunks one read brought, one frame) when it reads them
            asked = frame.body.get("compact")
            compact = ChunkEncoder() if asked else None
            ended = False
            try:
                if compact is not None and type(asked) is int and asked >= COMPACT_BATCHES:
                    async for batch in streamed.batches():
                        for body in compact.encode_batch(batch):
                            await stream.send(FrameType.DATA, body)
                else:
                    async for chunk in streamed:
                        body = compact.encode(chunk) if compact is not None else chunk
                        await stream.send(FrameType.DATA, body)
                meter = streamed.meter
                energy = meter.energy_report()
                # the model back before the END (a load report sent after the END never
                # counts this request), metered after it: in a loop callback queued after
                # the END's write round (`Link.kick`), off the answer's way
                await streamed.release()
                await stream.send(FrameType.END, {"usage": meter.usage, **energy})
                ended = True
            finally:
                await streamed.aclose(meter_later=ended)
        else:
            # DATA and END as one frame (`Stream.send_last`); the metering (`Meter.finish`)
            # runs in a loop callback after its write round (`meter_later`), off the way
            async with pipeline.answer(*args, via="tunnel", local_only=True,
                                       meter_later=True) as done:
                await stream.send_last(
                    done.data, {"usage": done.usage, **done.meter.energy_report()})
    except OpenAIError as exc:
        await stream.send(
            FrameType.ERROR,
            error_body(exc.status, exc.message, code=exc.code, hop=exc.hop or "node",
                       param=exc.param),
        )
