"""The model manager tests' world: a fake runner factory (named a fake: no process, no
model), an injected memory budget and clock, and small helpers to ask and wait."""


from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from node_agent.inventory import ModelFile
from node_agent.models import LlamaSpec, ModelManager, RunnerLike
from node_agent.placement import Budget, place
from node_agent.runtimes.llama.supervisor import RunnerError

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


def manager_maker(box: Box, tmp_path: Path) -> Callable[..., ModelManager]:
    """``make(fits, **opts)``: a manager whose budget holds ``fits`` tiny models."""

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
