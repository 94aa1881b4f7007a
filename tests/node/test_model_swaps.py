"""The model manager's swaps (overlapped, drained in place, refused, failed) with a fake
runner factory (tests/node/model_manager_harness.py). The real-runner swap is
tests/node/test_swap.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from meshgate.openai import OpenAIError
from node_agent.models import ModelManager
from tests.node.model_manager_harness import (
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


async def test_a_swap_that_fits_beside_the_old_model_overlaps(
    make: Callable[..., ModelManager],
    box: Box,
) -> None:
    manager = make(2.5)
    await manager.load("chat", "a")
    result = await manager.swap("chat", "b")
    assert result["mode"] == "overlap"
    assert (result["from"]["runner"], result["to"]["runner"]) == ("chat.1", "chat.2")
    assert box.events == ["start chat.1", "start chat.2", "stop chat.1"]
    assert await ask(manager, "chat") == "chat.2"
    assert manager.stats()["chat"]["source"] == "b"
    await manager.stop()


async def test_a_swap_that_only_fits_in_place_drains_first_and_queues_new_requests(
    make: Callable[..., ModelManager],
    box: Box,
) -> None:
    manager = make(1.5)
    await manager.load("chat", "a")
    async with manager.use("chat") as old:
        swap = asyncio.create_task(manager.swap("chat", "b"))
        await until(lambda: manager.stats()["chat"]["state"] == "swapping")
        queued = asyncio.create_task(ask(manager, "chat"))
        await until(lambda: manager.stats()["chat"]["queued"] == 1)
        data, _ = await old.complete("completions", b"{}")  # the old runner still answers
        assert json.loads(data)["runner"] == "chat.1"
        assert box.events == ["start chat.1"]
    assert await queued == "chat.2"
    assert (await swap)["mode"] == "drain-first"
    assert box.events == ["start chat.1", "stop chat.1", "start chat.2"]
    assert manager.stats()["chat"]["served"] == 2
    await manager.stop()


async def test_a_swap_that_fits_nowhere_is_refused_and_changes_nothing(
    make: Callable[..., ModelManager],
    box: Box,
) -> None:
    manager = make(1.5)
    await manager.load("chat", "a")
    with pytest.raises(OpenAIError, match=r"cannot load chat: .*does not fit") as caught:
        await manager.swap("chat", "big")
    assert caught.value.status == 503
    assert box.events == ["start chat.1"]
    assert await ask(manager, "chat") == "chat.1"
    await manager.stop()


async def test_a_swap_whose_new_runner_fails_brings_the_old_model_back(
    make: Callable[..., ModelManager],
    box: Box,
) -> None:
    manager = make(1.5)
    await manager.load("chat", "a")
    box.fail.add("chat.2")
    with pytest.raises(OpenAIError, match="exited with code 1") as caught:
        await manager.swap("chat", "b")
    assert (caught.value.status, caught.value.code) == (502, "runner_failed")
    assert box.events == ["start chat.1", "stop chat.1", "start chat.2", "start chat.3"]
    assert await ask(manager, "chat") == "chat.3"
    assert manager.stats()["chat"]["source"] == "a"
    await manager.stop()


async def test_an_overlap_swap_whose_new_runner_fails_leaves_the_old_one_serving(
    make: Callable[..., ModelManager],
    box: Box,
) -> None:
    manager = make(2.5)
    await manager.load("chat", "a")
    box.fail.add("chat.2")
    with pytest.raises(OpenAIError, match="exited with code 1") as caught:
        await manager.swap("chat", "b")
    assert caught.value.status == 502
    assert box.events == ["start chat.1", "start chat.2"]
    assert await ask(manager, "chat") == "chat.1"
    stats = manager.stats()["chat"]
    assert (stats["state"], stats["source"], stats["swaps"]) == ("loaded", "a", 0)
    assert stats["memory_estimate_bytes"] == NEED
    await manager.load("other", "c")  # the failed runner's memory was given back
    assert manager.stats()["chat"]["state"] == "loaded"
    await manager.stop()
