"""Dispatch over real tunnels (dispatch_harness.py: the real Gateway and Registry, real
loopback websockets, scripted nodes), part one: streaming, usage, batches, failover."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from coordinator.config import DispatchConfig
from coordinator.dispatch import Dispatcher
from meshgate.openai import OpenAIError
from meshgate.token_frames import COMPACT_BATCHES, ChunkEncoder
from tests.coordinator.dispatch_harness import (
    MODEL,
    Fleet,
    ScriptedNode,
    answer,
    drain,
    drop_link_after_data,
    drop_link_before_data,
    fail_500,
    fleet,
    refuse_400,
    request,
    want,
)
from tunnel import Frame, FrameType, Stream

__all__ = ["fleet"]  # the fixture, used by name below


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
