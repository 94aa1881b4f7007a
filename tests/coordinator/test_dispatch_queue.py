"""Dispatch over real tunnels (dispatch_harness.py), two: routes, cancels, first-token
and stall timeouts, the queue, revokes, loads on demand, silent nodes."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from coordinator.config import DispatchConfig
from coordinator.dispatch import Dispatcher
from coordinator.routing import Prefer
from coordinator.served import NodeAttempt
from meshgate.openai import OpenAIError
from tests.coordinator.dispatch_harness import (
    MODEL,
    Fleet,
    ScriptedNode,
    answer,
    drain,
    fleet,
    hang_until_cancel,
    one_chunk_then_wait,
    request,
    want,
)
from tunnel import Frame, FrameType, Stream

__all__ = ["fleet"]  # the fixture, used by name below


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
    await node.until_cancelled()
    assert node.cancelled == 1
    assert served.outcome == "client_cancelled"


async def test_no_first_token_in_time_moves_on_and_cancels_the_slow_node(fleet: Fleet) -> None:
    slow = await fleet.node("slow", hang_until_cancel, decode_tps=1000.0)
    good = await fleet.node("good", answer, decode_tps=1.0)
    config = DispatchConfig(first_token_timeout_s=0.3)
    served = await Dispatcher(fleet.registry, config).start(request(), want())
    await drain(served)
    assert served.node_did == good.name
    await slow.until_cancelled()
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
