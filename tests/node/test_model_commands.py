"""The model manager's commands (load, swap, unload, remove), its stats for telemetry,
its stop, and the quantization it picks, with a fake runner factory
(tests/node/model_manager_harness.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshgate.openai import OpenAIError
from node_agent.inventory import ModelFile
from node_agent.models import LlamaSpec, ModelManager, RunnerLike
from tests.node.model_manager_harness import (
    NEED,
    TINY,
    Box,
    FakeRunner,
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


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("swap", 400, "a command is a JSON object"),
        ({"op": "dance", "model": "chat"}, 400, "unknown op 'dance'"),
        ({"op": "swap", "model": "chat"}, 400, "missing 'to'"),
        ({"op": "swap", "model": "", "to": "b"}, 400, "'model' must be a non-empty string"),
        ({"op": "swap", "model": "chat", "to": "b", "n_ctx": "big"}, 400, "'n_ctx' must be a int"),
        ({"op": "swap", "model": "nope", "to": "b"}, 404, "nope"),
        ({"op": "swap", "model": "chat", "to": "b", "n_ctx": 0}, 400, "out of range"),
        ({"op": "load", "model": "x", "from": "b", "keep_alive": -1}, 400, "keep_alive"),
        ({"op": "swap", "model": "chat", "to": "m.bin"}, 400, "no model or family named 'm.bin'"),
        ({"op": "unload", "model": "nope"}, 404, "nope"),
    ],
)
async def test_commands_refuse_bad_input_clearly_and_change_nothing(
    make: Callable[..., ModelManager],
    body: Any,
    status: int,
    message: str,
) -> None:
    manager = make(2)
    await manager.load("chat", "a")
    with pytest.raises(OpenAIError) as caught:
        await manager.command(body)
    assert caught.value.status == status
    assert message in caught.value.message
    assert manager.stats()["chat"]["state"] == "loaded"
    await manager.stop()


async def test_commands_load_swap_and_unload(make: Callable[..., ModelManager]) -> None:
    manager = make(2.5)
    loaded = await manager.command({"op": "load", "model": "chat", "from": "a", "n_ctx": 1024})
    assert loaded["loaded"] is True
    assert loaded["n_ctx"] == 1024
    swapped = await manager.command({"op": "swap", "model": "chat", "to": "c"})
    assert swapped["to"]["n_ctx"] == 1024  # the old runner's options carry over
    assert (await manager.command({"op": "unload", "model": "chat"}))["state"] == "unloaded"
    stats = manager.stats()["chat"]
    assert (stats["swaps"], stats["source"], stats["state"]) == (1, "c", "unloaded")
    await manager.stop()


async def test_stats_report_what_telemetry_needs(
    make: Callable[..., ModelManager],
    box: Box,
) -> None:
    manager = make(2)
    await manager.load("a", "a")
    box.now = 3
    await ask(manager, "a")
    box.now = 7
    stats = manager.stats()["a"]
    for key in (
        "state",
        "kind",
        "memory_estimate_bytes",
        "rss_bytes",
        "in_flight",
        "queued",
        "served",
        "prompt_tokens_per_s",
        "generation_tokens_per_s",
        "crashes",
        "restarts",
        "last_used",
        "idle_s",
        "n_gpu_layers",
        "quantization",
        "pid",
    ):
        assert key in stats
    assert stats["memory_estimate_bytes"] == NEED
    assert (stats["served"], stats["idle_s"], stats["runner"]) == (1, 4.0, "a.1")
    await manager.stop()


async def test_stopping_fails_waiting_requests_at_once_and_stops_a_runner_mid_start(
    make: Callable[..., ModelManager],
    box: Box,
) -> None:
    manager = make(2)
    await manager.load("a", "a")
    await manager.unload("a")
    box.starting.clear()
    waiting = asyncio.create_task(ask(manager, "a"))
    await until(lambda: manager.stats()["a"]["queued"] == 1)
    await manager.stop()
    with pytest.raises(OpenAIError, match="the node is stopping") as caught:
        await waiting
    assert caught.value.status == 503
    assert box.events[-2:] == ["start a.2", "stop a.2"]


def llama7b(quantization: str, bits: float) -> ModelFile:
    """Llama-2-7B shapes (32 layers, 4096 wide, 32 heads) at `bits` per weight."""
    weights = int(6_738_415_616 * bits / 8)
    return replace(
        TINY,
        path=f"/m/llama-7b.{quantization}.gguf",
        name=f"llama-7b.{quantization}",
        quantization=quantization,
        parameter_count=6_738_415_616,
        tensor_bytes=weights,
        size_bytes=weights,
        context_length=4096,
        block_count=32,
        embedding_length=4096,
        head_count=32,
        head_count_kv=32,
    )


Q4, Q8, F16 = llama7b("Q4_K_M", 4.85), llama7b("Q8_0", 8.5), llama7b("F16", 16.0)


async def test_loading_a_family_picks_the_best_quantization_for_the_gpu_and_its_layers(
    box: Box,
    tmp_path: Path,
) -> None:
    from node_agent.placement import measure_budget
    from tests.node.fake_nvml import FakeNvml, load_fixture

    made: list[tuple[Path, int]] = []

    def factory(name: str, instance: str, spec: LlamaSpec, path: Path, layers: int) -> RunnerLike:
        made.append((path, layers))
        return FakeRunner(box, name, instance, layers)

    rtx = load_fixture("nvml_rtx4090_x2.json")
    rtx["gpus"] = rtx["gpus"][:1]  # the busy one: 5.5 GiB free
    budget = measure_budget(FakeNvml(rtx), available_ram=64 << 30)
    manager = ModelManager(
        run_dir=tmp_path, budget=budget, inventory=lambda: [Q8, F16, Q4], runner_factory=factory
    )
    loaded = await manager.load("chat", "llama-7b", n_ctx=2048)
    assert made == [(Path(Q4.path), 32)]  # Q4_K_M wholly on the GPU beats Q8_0 split
    assert (loaded["quantization"], loaded["n_gpu_layers"]) == ("Q4_K_M", 32)
    assert "also fit" in loaded["placement"]
    await manager.stop()


async def test_a_declared_model_loads_on_its_first_request(
    make: Callable[..., ModelManager],
    box: Box,
    model_path: Path,  # a real GGUF file: declare() reads it when it loads
) -> None:
    manager = make(100)
    await manager.start()
    manager.declare("late", model_path, n_ctx=2048)
    assert manager.stats()["late"]["state"] == "unloaded"
    assert box.events == []  # nothing started until asked
    assert await ask(manager, "late") == "late.1"
    assert manager.stats()["late"]["state"] == "loaded"
    await manager.stop()


async def test_removing_a_model_drains_it_then_answers_404(
    make: Callable[..., ModelManager],
    box: Box,
) -> None:
    manager = make(2)
    await manager.load("a", "a")
    async with manager.use("a") as runtime:
        removal = asyncio.create_task(manager.remove("a"))
        await until(lambda: "a" not in manager.names())
        assert "stop a.1" not in box.events  # the request in flight is drained first
        data, _ = await runtime.complete("completions", b"{}")
        assert json.loads(data)["runner"] == "a.1"
    assert await removal is True
    assert box.events[-1] == "stop a.1"
    with pytest.raises(OpenAIError) as caught:
        await ask(manager, "a")
    assert caught.value.status == 404
    assert await manager.remove("a") is False
    await manager.stop()
