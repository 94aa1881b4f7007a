"""The model manager's load, eviction, keep-alive and queue decisions, with an injected
memory budget and clock and a fake runner factory (tests/node/model_manager_harness.py)
so that each rule is checked exactly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from meshgate.openai import OpenAIError
from node_agent.models import ModelManager
from node_agent.placement import Budget, place
from tests.node.model_manager_harness import (
    MODELS,
    NEED,
    Box,
    ask,
    manager_maker,
    until,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def box() -> Box:
    return Box()


@pytest.fixture
def make(box: Box, tmp_path: Path) -> Callable[..., ModelManager]:
    return manager_maker(box, tmp_path)


async def test_a_load_that_does_not_fit_evicts_the_least_recently_used_idle_model(
    make: Callable[..., ModelManager],
    box: Box,
) -> None:
    manager = make(2.5)
    await manager.load("a", "a")
    box.now = 1
    await manager.load("b", "b")
    box.now = 5
    assert await ask(manager, "a") == "a.1"  # a is now the more recently used
    box.now = 6
    await manager.load("c", "c")
    states = {n: s["state"] for n, s in manager.stats().items()}
    assert states == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    assert box.events == ["start a.1", "start b.2", "stop b.2", "start c.3"]
    await manager.stop()


async def test_a_model_with_a_request_in_flight_is_never_evicted(
    make: Callable[..., ModelManager],
    box: Box,
) -> None:
    manager = make(1.5)
    await manager.load("a", "a")
    async with manager.use("a"):
        with pytest.raises(OpenAIError) as caught:
            await manager.load("b", "b")
        assert caught.value.status == 503
        assert caught.value.code == "insufficient_memory"
        assert "busy, never evicted: a (1 in flight or queued)" in caught.value.message
        assert manager.stats()["a"]["state"] == "loaded"
        assert "b" not in manager.names()
    await manager.load("b", "b")  # idle now: evicted
    assert manager.stats()["a"]["state"] == "unloaded"
    await manager.stop()


async def test_an_evicted_model_loads_again_on_its_next_request(
    make: Callable[..., ModelManager],
    box: Box,
) -> None:
    manager = make(1.5)
    await manager.load("a", "a")
    await manager.load("b", "b")
    assert manager.stats()["a"]["state"] == "unloaded"
    assert await ask(manager, "a") == "a.3"  # evicting b, now the least recently used
    assert manager.stats()["b"]["state"] == "unloaded"
    assert box.events[-2:] == ["stop b.2", "start a.3"]
    await manager.stop()


async def test_nothing_to_load_from_or_too_big_is_refused_with_the_reason(
    make: Callable[..., ModelManager],
) -> None:
    manager = make(100)
    with pytest.raises(OpenAIError, match="does not fit") as caught:
        await manager.load("huge", "big")
    assert caught.value.status == 503
    with pytest.raises(OpenAIError, match="no model or family named 'nope'"):
        await manager.load("x", "nope")
    with pytest.raises(OpenAIError, match="no such model file"):
        await manager.load("x", "/nowhere/x.gguf")
    with pytest.raises(OpenAIError) as unknown:
        await manager.load("never-declared")
    assert unknown.value.status == 404
    assert manager.names() == []
    await manager.stop()


async def test_keep_alive_unloads_a_model_idle_that_long_and_not_a_busy_one(
    make: Callable[..., ModelManager],
    box: Box,
) -> None:
    manager = make(3)
    await manager.load("a", "a", keep_alive=10)
    await manager.load("b", "b", keep_alive=10)
    await manager.load("c", "c")  # no keep-alive: stays
    await ask(manager, "a")
    await ask(manager, "b")
    await ask(manager, "c")
    box.now = 9
    assert await manager.reap() == []
    box.now = 20
    async with manager.use("b"):
        assert await manager.reap() == ["a"]
    assert {n: s["state"] for n, s in manager.stats().items()} == {
        "a": "unloaded",
        "b": "loaded",
        "c": "loaded",
    }
    await manager.stop()


async def test_requests_wait_while_a_model_loads_in_a_bounded_queue(
    make: Callable[..., ModelManager],
    box: Box,
) -> None:
    manager = make(2, max_queue=2)
    await manager.load("a", "a")
    await manager.unload("a")
    box.starting.clear()
    waiting = [asyncio.create_task(ask(manager, "a")) for _ in range(2)]
    await until(lambda: manager.stats()["a"]["queued"] == 2)
    assert manager.stats()["a"]["state"] == "loading"
    with pytest.raises(OpenAIError) as full:
        await ask(manager, "a")
    assert (full.value.status, full.value.code) == (503, "queue_full")
    assert "queue is full (2 waiting)" in full.value.message
    box.starting.set()
    assert await asyncio.gather(*waiting) == ["a.2", "a.2"]
    await manager.stop()


async def test_a_request_that_waits_past_the_deadline_is_a_504(
    make: Callable[..., ModelManager],
    box: Box,
) -> None:
    manager = make(2, queue_timeout=0.05)
    await manager.load("a", "a")
    await manager.unload("a")
    box.starting.clear()
    with pytest.raises(OpenAIError) as caught:
        await ask(manager, "a")
    assert caught.value.status == 504
    assert "waited 0.05 s for a (loading)" in caught.value.message
    box.starting.set()
    await until(lambda: manager.stats()["a"]["state"] == "loaded")
    await manager.stop()


async def test_a_victim_that_takes_a_request_while_others_are_evicted_is_spared(
    make: Callable[..., ModelManager],
    box: Box,
) -> None:
    manager = make(3.2)
    for i, name in enumerate(("b", "c", "a")):
        box.now = i
        await manager.load(name, name)
    assert place([MODELS[-1]], 2048, Budget(1 << 40, 0)).ram_bytes > 1.8 * NEED
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold_c() -> None:
        async with manager.use("c"):
            held.set()
            await release.wait()

    async def on_stop(instance: str) -> None:
        if instance == "b.1":  # c, next in the plan, gets a request meanwhile
            box.on_stop = None
            task = asyncio.create_task(hold_c())
            await held.wait()
            box.tasks = [task]

    box.on_stop = on_stop
    await manager.load("d", "double")
    states = {n: s["state"] for n, s in manager.stats().items()}
    assert states == {"a": "unloaded", "b": "unloaded", "c": "loaded", "d": "loaded"}
    assert box.events[-3:] == ["stop b.1", "stop a.3", "start d.4"]
    release.set()
    await asyncio.gather(*box.tasks)
    await manager.stop()
