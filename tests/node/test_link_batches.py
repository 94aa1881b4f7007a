"""The link's stream answer in compact batches: the chunks a runtime read together leave
in one DATA frame when the coordinator reads batches (``compact`` 2), one frame each when
it asks for single compact chunks (1); either way the coordinator's decoder gives every
chunk, byte for byte as one frame each would. Over a real tunnel pair."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest

from meshgate.protocol import OpenRequest
from meshgate.token_frames import COMPACT_BATCHES, ChunkDecoder
from node_agent.link import answer
from node_agent.models import ModelManager
from node_agent.pipeline import Pipeline
from node_agent.placement import Budget
from node_agent.runtimes.base import FakeRuntime
from tests.tunnel.mux_pair import Pair, mux_pair
from tunnel import Frame, FrameType, Stream, until_cancelled

CHUNKS = 10  # text chunks; then the finish chunk and the usage chunk: 12 in all


class BurstyRuntime(FakeRuntime):
    """The named fake runtime, its chunks read in bursts of four (as from one read of a
    runner's socket)."""

    async def stream_batches(self, endpoint: str, body: bytes
                             ) -> AsyncGenerator[list[bytes], None]:
        batch: list[bytes] = []
        async for chunk in self.stream(endpoint, body):
            batch.append(chunk)
            if len(batch) == 4:
                yield batch
                batch = []
        if batch:
            yield batch


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    manager = ModelManager(run_dir=Path("/nonexistent"), budget=Budget(1 << 30, 0))
    manager.add_runtime(BurstyRuntime("m", chunks=CHUNKS))
    pipeline = Pipeline(manager)

    async def serve(stream: Stream, frame: Frame) -> None:
        await until_cancelled(stream, answer(pipeline, stream, frame))

    pair = await mux_pair(coord_on_stream=serve)
    yield pair
    await pair.close()


async def ask(pair: Pair, compact: int | None) -> list[bytes]:
    body = json.dumps({"model": "m", "stream": True, "max_tokens": CHUNKS,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    wire = OpenRequest("req_1", "chat/completions", "m", True, body).to_wire()
    if compact is not None:
        wire["compact"] = compact
    stream = await pair.node_mux.open(wire)
    bodies: list[bytes] = []
    async for frame in stream:
        if frame.type == FrameType.END:
            break
        assert frame.type == FrameType.DATA
        bodies.append(frame.body)
    return bodies


def timeless(chunk: bytes) -> dict[str, object]:
    """A chunk without its ``created`` (each request has its own)."""
    value: dict[str, object] = json.loads(chunk)
    value.pop("created", None)
    return value


async def test_a_burst_leaves_in_one_frame_only_for_a_coordinator_that_reads_batches(
        pair: Pair) -> None:
    plain = await ask(pair, None)
    single = await ask(pair, 1)
    batched = await ask(pair, COMPACT_BATCHES)
    assert len(plain) == len(single) == CHUNKS + 2  # one frame a chunk
    # the first chunk alone, then the rest of its burst of 4, then bursts of 4, then 4
    assert len(batched) == 4
    decoder = ChunkDecoder()
    assert len(decoder.decode_many(batched[0])) == 1
    chunks = [c for body in batched[1:] for c in decoder.decode_many(body)]
    one_each = ChunkDecoder()
    assert [timeless(c) for c in [one_each.decode(single[0]), *chunks]] == [
        timeless(c) for c in plain]
    rest = [one_each.decode(body) for body in single[1:]]
    assert chunks == rest  # byte for byte what one frame a chunk gives


async def test_the_model_is_back_before_the_end_and_metered_after_it() -> None:
    """A load report the node sends after the END must not count the request (the
    coordinator's next request would find the node busy): the model is given back before
    the END is queued; the metering runs after the END's write round, before anything else
    the loop does."""
    manager = ModelManager(run_dir=Path("/nonexistent"), budget=Budget(1 << 30, 0))
    manager.add_runtime(BurstyRuntime("m", chunks=CHUNKS))
    pipeline = Pipeline(manager)
    in_flight_at_end: list[int] = []
    metered_at_end: list[int] = []
    finished: list[int] = []
    pipeline.on_finish(lambda done: finished.append(done.status))
    slot = manager._slots["m"]

    async def serve(stream: Stream, frame: Frame) -> None:
        original = stream.send

        async def send(type: FrameType, body: object) -> None:
            if type == FrameType.END:
                in_flight_at_end.append(slot.in_flight)
                metered_at_end.append(len(finished))  # this one not yet: after the END
            await original(type, body)

        stream.send = send  # type: ignore[method-assign]
        await until_cancelled(stream, answer(pipeline, stream, frame))

    pair = await mux_pair(coord_on_stream=serve)
    try:
        for compact in (None, COMPACT_BATCHES):
            await ask(pair, compact)
        assert in_flight_at_end == [0, 0]
        assert metered_at_end == [0, 1]
        assert finished == [200, 200]  # metered by the time the END was read
    finally:
        await pair.close()
