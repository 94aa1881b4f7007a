"""The model manager's load, eviction, keep-alive, queue and swap decisions, with an
injected memory budget and clock, and a fake runner factory (named a fake: no
process, no model) so that each rule is checked exactly. The real-runner swap
is tests/node/test_swap.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshgate.openai import OpenAIError
from node_agent.inventory import ModelFile
from node_agent.models import LlamaSpec, ModelManager, RunnerLike
from node_agent.placement import Budget, place
from node_agent.runtimes.llama.supervisor import RunnerError

pytestmark = pytest.mark.timeout(30)

TINY = ModelFile(
    path="/m/a.gguf",
    name="a",
    size_bytes=50_000_000,
    mtime_ns=0,
    usable=True,
    architecture="llama",
    parameter_count=100_000_000,
    quantization="Q4_0",
    tensor_bytes=50_000_000,
    context_length=2048,
    block_count=12,
    embedding_length=512,
    head_count=8,
    head_count_kv=8,
    vocab_size=32000,
)
MODELS = [
    TINY,
    replace(TINY, path="/m/b.gguf", name="b"),
    replace(TINY, path="/m/c.gguf", name="c"),
    replace(TINY, path="/m/big.gguf", name="big", tensor_bytes=50_000_000_000),
    replace(TINY, path="/m/double.gguf", name="double", tensor_bytes=230_000_000),
]
NEED = place([TINY], 2048, Budget(1 << 40, 0)).ram_bytes  # one tiny model at n_ctx 2048


class FakeRuntime:
    kind = "llama.cpp"

    def __init__(self, name: str, instance: str) -> None:
        self.name, self.instance = name, instance

    async def health(self) -> bool:
        return True

    async def complete(self, endpoint: str, body: bytes) -> tuple[bytes, dict[str, int] | None]:
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        return json.dumps({"runner": self.instance}).encode(), usage

    async def stream(self, endpoint: str, body: bytes) -> AsyncIterator[bytes]:
        yield json.dumps({"runner": self.instance}).encode()


class FakeRunner:
    def __init__(self, box: Box, name: str, instance: str, layers: int) -> None:
        self.box, self.instance, self.layers = box, instance, layers
        self.runtime = FakeRuntime(name, instance)
        self.pid: int | None = None
        self.crashes = self.restarts = 0
        self.state = "stopped"

    async def start(self) -> None:
        self.box.events.append(f"start {self.instance}")
        await self.box.starting.wait()
        if self.instance in self.box.fail:
            raise RunnerError(f"runner {self.instance} exited with code 1 while starting")
        self.state = "up"

    async def stop(self) -> None:
        self.box.events.append(f"stop {self.instance}")
        if self.box.on_stop is not None:
            await self.box.on_stop(self.instance)
        self.state = "stopped"


class Box:
    """The fake runners' world: what happened, which starts fail, a gate on starting."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.fail: set[str] = set()
        self.starting = asyncio.Event()
        self.starting.set()
        self.now = 0.0
        self.on_stop: Callable[[str], Awaitable[None]] | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def factory(
        self, name: str, instance: str, spec: LlamaSpec, path: Path, layers: int
    ) -> RunnerLike:
        return FakeRunner(self, name, instance, layers)


@pytest.fixture
async def box() -> Box:
    return Box()


@pytest.fixture
def make(box: Box, tmp_path: Path) -> Callable[..., ModelManager]:
    def make(fits: float, **opts: Any) -> ModelManager:
        return ModelManager(
            run_dir=tmp_path,
            budget=Budget(int(NEED * fits), 0),
            inventory=lambda: MODELS,
            runner_factory=box.factory,
            clock=lambda: box.now,
            **opts,
        )

    return make


async def ask(manager: ModelManager, name: str) -> str:
    async with manager.use(name) as runtime:
        data, _ = await runtime.complete("completions", b"{}")
    runner: str = json.loads(data)["runner"]
    return runner


async def until(check: Callable[[], bool]) -> None:
    while not check():  # noqa: ASYNC110 - the manager's own state, no event to wait on
        await asyncio.sleep(0.001)


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
