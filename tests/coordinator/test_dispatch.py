"""Dispatch over real tunnels: the real Gateway and Registry on a real SQLite store, real
loopback websockets with the Noise handshake, and scripted nodes (`ScriptedNode`, a fake
of the node agent's request handling that speaks the real stream protocol) whose
behaviour each test chooses: answer, refuse, hang, drop the link before or after the
first chunk."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from coordinator.config import DispatchConfig
from coordinator.dispatch import Dispatcher
from coordinator.gateway import Gateway
from coordinator.registry import Registry
from coordinator.routing import Prefer
from coordinator.scheduler import Request
from coordinator.served import NodeAttempt, Served
from coordinator.store import Store
from meshgate.openai import OpenAIError
from meshgate.protocol import OpenRequest, error_body
from meshgate.token_frames import COMPACT_BATCHES, ChunkEncoder
from tunnel import Frame, FrameType, Identity, Link, Mux, Stream, connect, serve
from tunnel.noise import public_bytes

MODEL = "m"
Behaviour = Callable[["ScriptedNode", Stream, Frame], Awaitable[None]]


async def answer(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
    for i in range(3):
        await stream.send(FrameType.DATA, json.dumps({"i": i, "by": node.name}).encode())
    await stream.send(FrameType.END, {"usage": {"prompt_tokens": 5, "completion_tokens": 3}})


async def fail_500(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
    await stream.send(FrameType.ERROR, error_body(500, "runner crashed", hop="runner"))


async def refuse_400(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
    await stream.send(FrameType.ERROR, error_body(400, "max_tokens must be positive"))


async def drop_link_before_data(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
    await node.link.close("simulated crash")


async def drop_link_after_data(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
    await stream.send(FrameType.DATA, b'{"i": 0}')
    await asyncio.sleep(0.05)
    await node.link.close("simulated crash")


async def hang_until_cancel(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
    async for got in stream:
        if got.type == FrameType.CANCEL:
            node.cancelled += 1
            return


async def one_chunk_then_wait(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
    await stream.send(FrameType.DATA, b'{"i": 0}')
    await hang_until_cancel(node, stream, frame)


@dataclass
class ScriptedNode:
    name: str
    link: Link
    behaviour: Behaviour
    requests: list[dict[str, Any]] = field(default_factory=list)
    cancelled: int = 0
    task: asyncio.Task[None] | None = None
    mux: Mux | None = None
    commands: list[dict[str, Any]] = field(default_factory=list)
    refuse_load: str | None = None

    async def on_control(self, frame: Frame) -> None:
        """COMMAND load: answer RESULT (after a moment), then report the model loaded."""
        if frame.type != FrameType.COMMAND:
            return
        assert self.mux is not None
        self.commands.append(frame.body)
        await asyncio.sleep(0.2)
        head = {"id": frame.body["id"], "op": frame.body["op"]}
        if self.refuse_load:
            error = error_body(507, self.refuse_load)
            await self.mux.send_control(FrameType.RESULT, {**head, "ok": False, "error": error})
            return
        await self.mux.send_control(FrameType.RESULT, {**head, "ok": True, "result": {}})
        await self.mux.send_control(FrameType.INVENTORY, {"models": [
            {"name": frame.body["model"], "loaded": True}]})

    async def on_stream(self, stream: Stream, frame: Frame) -> None:
        self.requests.append(frame.body)
        await self.behaviour(self, stream, frame)


@dataclass
class Fleet:
    store: Store
    registry: Registry
    gateway: Gateway
    key: X25519PrivateKey
    url: str
    nodes: list[ScriptedNode] = field(default_factory=list)

    async def node(self, name: str, behaviour: Behaviour, *, decode_tps: float = 0.0,
                   models: tuple[str, ...] = (MODEL,), loaded: bool = True) -> ScriptedNode:
        identity = Identity.generate()
        token_id, secret = self.store.create_token(60, {}, time.time())
        self.store.redeem_token(token_id, secret, identity.did, time.time())
        link = await connect(self.url, identity, public_bytes(self.key))
        node = ScriptedNode(name, link, behaviour)
        node.mux = Mux(link, initiator=True, on_stream=node.on_stream,
                       on_control=node.on_control)
        node.task = asyncio.create_task(node.mux.run())
        await node.mux.send_control(FrameType.INVENTORY, {"models": [
            {"name": m, "loaded": loaded, "size_bytes": 1 << 20} for m in models]})
        await node.mux.send_control(FrameType.TELEMETRY, {"runtime": {
            m: {"decode_tps": decode_tps, "prefill_tps": decode_tps} for m in models},
            "host": {"mem_available_bytes": 8 << 30}})
        deadline = time.monotonic() + 5
        while True:
            conn = self.registry.get(identity.did)
            if conn is not None and conn.models and conn.telemetry:
                break
            assert time.monotonic() < deadline, "node never registered"
            await asyncio.sleep(0.01)
        node.name = identity.did
        self.nodes.append(node)
        return node


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    registry = Registry()
    gateway = Gateway(store, registry)
    key = X25519PrivateKey.generate()
    server = await serve("127.0.0.1", 0, key, gateway.authorize, gateway.on_link)
    port = next(iter(server.sockets)).getsockname()[1]
    fleet = Fleet(store, registry, gateway, key, f"ws://127.0.0.1:{port}")
    yield fleet
    for node in fleet.nodes:
        await node.link.close()
        if node.task:
            with contextlib.suppress(Exception):
                await node.task
    server.close()
    await server.wait_closed()
    store.close()


def request(stream: bool = True) -> OpenRequest:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    return OpenRequest("req_1", "chat/completions", MODEL, stream, body.encode())


def want(**kw: Any) -> Request:
    return Request(models=kw.pop("models", [MODEL]), prompt_tokens=10, max_tokens=10, **kw)


async def drain(served: Served) -> list[bytes]:
    return [served.first, *[c async for c in served.rest()]]


async def test_snapshot_shows_inventory_telemetry_and_rtt(fleet: Fleet) -> None:
    node = await fleet.node("a", answer, decode_tps=42.0)
    await node.link.ping()
    await asyncio.sleep(0.1)
    snap = fleet.registry.snapshot()
    (view,) = snap.nodes
    assert view.did == node.name
    assert view.models[MODEL].decode_tps == 42.0
    assert view.connected
    assert fleet.registry.snapshot() is snap  # unchanged registry: same snapshot
    await fleet.registry.get(node.name).link.ping()  # type: ignore[union-attr]
    await asyncio.sleep(0.1)
    assert fleet.registry.snapshot().nodes[0].rtt_ms > 0


async def test_a_request_streams_from_the_node_and_reports_usage(fleet: Fleet) -> None:
    node = await fleet.node("a", answer)
    served = await Dispatcher(fleet.registry).start(request(), want())
    chunks = await drain(served)
    assert len(chunks) == 3
    assert served.outcome == "ok"
    assert served.usage == {"prompt_tokens": 5, "completion_tokens": 3}
    assert served.node_did == node.name
    assert fleet.registry.get(node.name).in_flight == 0  # type: ignore[union-attr]
    row = served.row("k1")
    assert (row["node_did"], row["outcome"], row["completion_tokens"]) == (node.name, "ok", 3)


TOKENS = [json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": f" t{i}"}}]},
                     separators=(",", ":")).encode() for i in range(8)]


async def answer_in_batches(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
    """As the node agent does for a coordinator that reads batches: the first chunk alone,
    then the rest as compact batches (meshgate/token_frames.py)."""
    assert frame.body["compact"] == COMPACT_BATCHES
    encoder = ChunkEncoder()
    await stream.send(FrameType.DATA, encoder.encode(TOKENS[0]))
    for burst in (TOKENS[1:2], TOKENS[2:7], TOKENS[7:]):
        for body in encoder.encode_batch(burst):
            await stream.send(FrameType.DATA, body)
    await stream.send(FrameType.END, {"usage": {"prompt_tokens": 5, "completion_tokens": 8}})


async def test_batched_token_frames_come_out_as_every_chunk_in_order(fleet: Fleet) -> None:
    await fleet.node("a", answer_in_batches)
    served = await Dispatcher(fleet.registry).start(request(), want())
    chunks = await drain(served)
    assert [json.loads(c) for c in chunks] == [json.loads(t) for t in TOKENS]
    assert served.chunks == len(TOKENS)
    assert served.outcome == "ok"


async def test_failure_before_the_first_token_goes_to_the_next_node(fleet: Fleet) -> None:
    bad = await fleet.node("bad", fail_500, decode_tps=1000.0)  # ranked first: fastest
    good = await fleet.node("good", answer, decode_tps=1.0)
    served = await Dispatcher(fleet.registry).start(request(), want())
    await drain(served)
    assert served.node_did == good.name
    assert served.tries == 2
    assert len(bad.requests) == 1
    assert len(good.requests) == 1


async def test_a_node_whose_tunnel_drops_before_data_is_failed_over_at_once(fleet: Fleet) -> None:
    crashing = await fleet.node("crash", drop_link_before_data, decode_tps=1000.0)
    good = await fleet.node("good", answer, decode_tps=1.0)
    started = time.monotonic()
    served = await Dispatcher(fleet.registry).start(request(), want())
    await drain(served)
    assert served.node_did == good.name
    assert len(crashing.requests) == 1
    assert time.monotonic() - started < 5  # not the first-token timeout (60 s)


async def test_a_node_lost_mid_stream_ends_with_an_error_and_is_not_retried(
    fleet: Fleet,
) -> None:
    dying = await fleet.node("dying", drop_link_after_data, decode_tps=1000.0)
    other = await fleet.node("other", answer, decode_tps=1.0)
    served = await Dispatcher(fleet.registry).start(request(), want())
    assert served.node_did == dying.name
    with pytest.raises(OpenAIError) as caught:
        await drain(served)
    assert caught.value.status == 502
    assert "disconnected mid-response" in caught.value.message
    assert served.outcome == "node_lost_mid_stream"
    assert other.requests == []  # nothing runs twice


async def test_a_bad_request_is_not_retried(fleet: Fleet) -> None:
    first = await fleet.node("a", refuse_400, decode_tps=1000.0)
    second = await fleet.node("b", answer, decode_tps=1.0)
    with pytest.raises(OpenAIError) as caught:
        await Dispatcher(fleet.registry).start(request(), want())
    assert caught.value.status == 400
    assert len(first.requests) == 1
    assert second.requests == []


async def test_when_every_node_fails_the_503_names_each_failure(fleet: Fleet) -> None:
    await fleet.node("a", fail_500)
    await fleet.node("b", fail_500)
    with pytest.raises(OpenAIError) as caught:
        await Dispatcher(fleet.registry).start(request(), want())
    assert caught.value.status == 503
    assert caught.value.message.count("runner crashed") == 2


async def test_at_most_max_tries_nodes_are_tried(fleet: Fleet) -> None:
    nodes = [await fleet.node(str(i), fail_500) for i in range(3)]
    with pytest.raises(OpenAIError):
        await Dispatcher(fleet.registry, DispatchConfig(max_tries=2)).start(request(), want())
    assert sum(len(n.requests) for n in nodes) == 2


async def test_no_candidate_is_a_503_that_says_why(fleet: Fleet) -> None:
    await fleet.node("a", answer)
    with pytest.raises(OpenAIError) as caught:
        await Dispatcher(fleet.registry).start(request(), want(models=["other"]))
    assert caught.value.status == 503
    assert "no node or cloud has model 'other'" in caught.value.message


async def test_route_candidates_in_order_and_the_body_names_the_chosen_model(
    fleet: Fleet,
) -> None:
    node = await fleet.node("a", answer, models=("small",))
    served = await Dispatcher(fleet.registry).start(
        request(), want(models=["big", "small"], prefer=Prefer.QUALITY))
    await drain(served)
    assert served.model == "small"
    assert node.requests[0]["model"] == "small"
    assert json.loads(node.requests[0]["body"])["model"] == "small"


async def test_closing_an_unfinished_request_sends_cancel_to_the_node(fleet: Fleet) -> None:
    node = await fleet.node("a", one_chunk_then_wait)
    served = await Dispatcher(fleet.registry).start(request(), want())
    await served.close()
    for _ in range(100):
        if node.cancelled:
            break
        await asyncio.sleep(0.02)
    assert node.cancelled == 1
    assert served.outcome == "client_cancelled"


async def test_no_first_token_in_time_moves_on_and_cancels_the_slow_node(fleet: Fleet) -> None:
    slow = await fleet.node("slow", hang_until_cancel, decode_tps=1000.0)
    good = await fleet.node("good", answer, decode_tps=1.0)
    config = DispatchConfig(first_token_timeout_s=0.3)
    served = await Dispatcher(fleet.registry, config).start(request(), want())
    await drain(served)
    assert served.node_did == good.name
    for _ in range(100):
        if slow.cancelled:
            break
        await asyncio.sleep(0.02)
    assert slow.cancelled == 1


async def test_requests_queued_at_a_one_slot_node_are_not_taken_for_a_dead_node(
        fleet: Fleet) -> None:
    """Three at once on a node that runs one at a time, each 0.2 s to its first token: the
    third waits 0.4 s for its turn, past the 0.3 s timeout of one request; it is not a
    node that stopped answering (that would leave it suspect, and with no other node, a 503)."""
    turn = asyncio.Lock()

    async def serially(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
        async with turn:
            await asyncio.sleep(0.2)
            await answer(node, stream, frame)

    node = await fleet.node("serial", serially)
    dispatcher = Dispatcher(fleet.registry, DispatchConfig(first_token_timeout_s=0.3,
                                                           node_slots=4))
    served = await asyncio.gather(*(dispatcher.start(request(), want()) for _ in range(3)))
    for one in served:
        assert len(await drain(one)) == 3
        assert one.node_did == node.name
    assert len(node.requests) == 3
    assert not fleet.registry.get(node.name).suspect  # type: ignore[union-attr]


async def test_a_stream_that_goes_silent_ends_with_a_stall_error(fleet: Fleet) -> None:
    await fleet.node("a", one_chunk_then_wait)
    config = DispatchConfig(idle_timeout_s=0.3)
    served = await Dispatcher(fleet.registry, config).start(request(), want())
    with pytest.raises(OpenAIError) as caught:
        await drain(served)
    assert caught.value.status == 504
    assert served.outcome == "idle_timeout"


async def test_busy_fleet_full_queue_is_a_429(fleet: Fleet) -> None:
    await fleet.node("a", one_chunk_then_wait)
    dispatcher = Dispatcher(fleet.registry, DispatchConfig(node_slots=1, queue_size=0))
    first = await dispatcher.start(request(), want())
    with pytest.raises(OpenAIError) as caught:
        await dispatcher.start(request(), want())
    assert caught.value.status == 429
    assert "queue is full" in caught.value.message
    await first.close()


async def test_a_queued_request_runs_when_a_slot_frees(fleet: Fleet) -> None:
    node = await fleet.node("a", one_chunk_then_wait)
    dispatcher = Dispatcher(fleet.registry, DispatchConfig(node_slots=1, queue_size=4))
    first = await dispatcher.start(request(), want())
    second = asyncio.create_task(dispatcher.start(request(), want()))
    await asyncio.sleep(0.2)
    assert not second.done()
    assert dispatcher.waiting == 1
    await first.close()
    served = await asyncio.wait_for(second, 5)
    assert isinstance(served, NodeAttempt)
    assert len(node.requests) == 2
    assert dispatcher.waiting == 0
    await served.close()


async def test_a_queued_request_past_its_deadline_is_a_504(fleet: Fleet) -> None:
    await fleet.node("a", one_chunk_then_wait)
    dispatcher = Dispatcher(fleet.registry, DispatchConfig(node_slots=1, queue_size=4))
    first = await dispatcher.start(request(), want())
    deadline = asyncio.get_running_loop().time() + 0.3
    with pytest.raises(OpenAIError) as caught:
        await dispatcher.start(request(), want(), deadline=deadline)
    assert caught.value.status == 504
    await first.close()


async def test_a_revoked_node_loses_its_tunnel(fleet: Fleet) -> None:
    node = await fleet.node("a", answer)
    fleet.store.revoke_node(node.name, time.time())
    assert await fleet.gateway.close_revoked() == [node.name]
    assert fleet.registry.get(node.name) is None
    assert node.task is not None
    await asyncio.wait_for(node.task, 5)  # the node's side of the link ended


async def test_a_model_loaded_nowhere_is_loaded_on_demand_once(fleet: Fleet) -> None:
    node = await fleet.node("a", answer, loaded=False)
    assert fleet.registry.snapshot().nodes[0].models[MODEL].loaded is False
    dispatcher = Dispatcher(fleet.registry)
    both = await asyncio.gather(dispatcher.start(request(), want()),
                                dispatcher.start(request(), want()))
    for served in both:
        await drain(served)
        assert served.outcome == "ok"
    assert node.commands == [{"op": "load", "model": MODEL, "id": "load-1"}]
    assert len(node.requests) == 2
    assert fleet.registry.snapshot().nodes[0].models[MODEL].loaded is True


async def test_a_node_that_cannot_load_is_passed_over_with_its_reason(fleet: Fleet) -> None:
    node = await fleet.node("a", answer, loaded=False)
    node.refuse_load = "not enough memory for m"
    with pytest.raises(OpenAIError) as caught:
        await Dispatcher(fleet.registry).start(request(), want())
    assert caught.value.status == 503
    assert "could not load m: not enough memory for m" in caught.value.message
    assert node.requests == []


async def test_a_node_that_went_silent_stays_last_until_it_answers_a_request(
        fleet: Fleet) -> None:
    slow = await fleet.node("slow", hang_until_cancel, decode_tps=1000.0)
    good = await fleet.node("good", answer, decode_tps=1.0)
    dispatcher = Dispatcher(fleet.registry, DispatchConfig(first_token_timeout_s=0.3))
    await drain(await dispatcher.start(request(), want()))
    conn = fleet.registry.get(slow.name)
    assert conn is not None
    assert conn.suspect
    served = await dispatcher.start(request(), want())  # slow still claims more, goes last
    await drain(served)
    assert (served.node_did, served.tries) == (good.name, 1)
    assert len(slow.requests) == 1
    assert slow.mux is not None
    # its telemetry is a claim, not proof (issue 9: a liar cleared its mark this way)
    await slow.mux.send_control(FrameType.TELEMETRY, {"runtime": {MODEL: {"decode_tps": 1e6}}})
    await slow.mux.send_control(FrameType.INVENTORY, {"models": [MODEL]})  # in order: after
    for _ in range(100):
        if conn.telemetry["runtime"][MODEL]["decode_tps"] == 1e6 and conn.inventory["models"] \
                == [MODEL]:
            break
        await asyncio.sleep(0.02)
    assert conn.suspect
    assert (await dispatcher.start(request(), want())).node_did == good.name
    # only an answer in time clears it
    slow.behaviour = answer
    await good.link.close()
    for _ in range(100):
        if fleet.registry.get(good.name) is None:
            break
        await asyncio.sleep(0.02)
    served = await dispatcher.start(request(), want())
    await drain(served)
    assert served.node_did == slow.name
    assert not conn.suspect


def test_embeddings_are_not_timed_by_a_chats_first_token() -> None:
    """A fast chat measured on a node must not give its first embeddings request (the
    runner opens an embedding context then: a load) a chat-sized first-token timeout."""
    from coordinator.dispatch import timed_as
    from coordinator.observed import TIMEOUT_FLOOR_S, Observed, first_token_timeout

    chat = Observed()
    chat.first_token(0.2, 10)
    observed = {timed_as("smollm2", "chat/completions"): chat}
    assert timed_as("smollm2", "completions") == "smollm2"
    assert first_token_timeout(60.0, observed.get(timed_as("smollm2", "chat/completions"))) \
        == TIMEOUT_FLOOR_S
    assert first_token_timeout(60.0, observed.get(timed_as("smollm2", "embeddings"))) == 60.0
