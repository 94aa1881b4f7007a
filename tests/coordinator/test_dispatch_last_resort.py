"""The first-token timeout learnt from a node's measured times is for failing over: with
another candidate left, a node far slower than usual is left for it; with none left, the
request waits up to the configured timeout instead of turning a slow answer into a 503.
(Found by a full run on a loaded box: a one-node mesh answered 503 "no first token within
10.7 s" where the configured timeout was 60 s.)"""

from __future__ import annotations

import asyncio

import pytest

from coordinator import observed
from coordinator.config import DispatchConfig
from coordinator.dispatch import Dispatcher
from tests.coordinator.dispatch_harness import (
    Behaviour,
    Fleet,
    ScriptedNode,
    answer,
    drain,
    fleet,
    request,
    want,
)
from tunnel import Frame, Stream

__all__ = ["fleet"]  # the fixture, used by name below

SLOW_S = 0.4  # the slow first token: 8x the learnt timeout below, a tenth of the configured


def fast_then_slow() -> tuple[list[int], Behaviour]:
    calls = [0]

    async def behaviour(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
        calls[0] += 1
        if calls[0] > 1:
            await asyncio.sleep(SLOW_S)
        await answer(node, stream, frame)

    return calls, behaviour


@pytest.fixture(autouse=True)
def learnt_timeout_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observed, "TIMEOUT_FLOOR_S", 0.05)  # 4 x a few ms, floored: 0.05 s


async def test_with_no_other_candidate_a_slow_first_token_is_waited_for(fleet: Fleet) -> None:
    calls, behaviour = fast_then_slow()
    node = await fleet.node("only", behaviour)
    dispatcher = Dispatcher(fleet.registry, DispatchConfig(first_token_timeout_s=4.0))
    await drain(await dispatcher.start(request(), want()))  # measured: a fast first token
    served = await dispatcher.start(request(), want())
    assert len(await drain(served)) == 3
    assert served.node_did == node.name
    assert calls[0] == 2
    assert not fleet.registry.get(node.name).suspect  # type: ignore[union-attr]


async def test_with_another_candidate_the_learnt_timeout_moves_on(fleet: Fleet) -> None:
    _, behaviour = fast_then_slow()
    slow = await fleet.node("usually fast", behaviour, decode_tps=1000.0)
    good = await fleet.node("good", answer, decode_tps=1.0)
    dispatcher = Dispatcher(fleet.registry, DispatchConfig(first_token_timeout_s=4.0))
    first = await dispatcher.start(request(), want())
    await drain(first)
    assert first.node_did == slow.name  # ranked first: its rates
    served = await dispatcher.start(request(), want())
    await drain(served)
    assert served.node_did == good.name
    assert fleet.registry.get(slow.name).suspect  # type: ignore[union-attr]
