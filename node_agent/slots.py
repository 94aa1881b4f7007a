"""What the model manager holds: specs, runners, backends and slots (the state, not the rules).

- :class:`LlamaSpec`: what to load (a file, or an inventory name or family) and how.
- :class:`RunnerLike`: what the manager needs of a runner (``LlamaRunner``, or a fake in tests).
- :class:`Backend`: one runtime serving a slot, with its placement and requests in flight.
- :class:`Slot`: one public name: its backend, the runners draining for it, the
  gate that holds requests while it is not loaded, and its counters.
- :class:`ManagerState`: the manager's fields, shared by its parts
  (:mod:`node_agent.manager_memory`, :mod:`node_agent.manager_commands`,
  :mod:`node_agent.models`).

The decisions (what to load, evict or swap) are :class:`node_agent.models.ModelManager`'s.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from meshgate.openai import OpenAIError
from node_agent.inventory import ModelFile
from node_agent.placement import Budget, Placement
from node_agent.runtimes.base import Runtime

RATE_WINDOW = 32  # requests in the tokens/s figures


@dataclass(frozen=True, slots=True)
class LlamaSpec:
    """What to load: a file (`path`) or an inventory name or family (`source`)."""

    source: str
    path: Path | None = None
    n_ctx: int = 2048
    n_gpu_layers: int | None = None  # None: placement decides
    n_threads: int | None = None
    ready_timeout: float = 120.0


class RunnerLike(Protocol):
    @property
    def runtime(self) -> Runtime: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def crashes(self) -> int: ...
    @property
    def restarts(self) -> int: ...
    @property
    def state(self) -> str: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


# (public name, instance name, spec, chosen file, n_gpu_layers) -> a runner not yet started
RunnerFactory = Callable[[str, str, LlamaSpec, Path, int], RunnerLike]


class Rates:
    """Recent prompt and generation tokens per second (streamed requests time both)."""

    def __init__(self) -> None:
        self._prompt: deque[tuple[int, float]] = deque(maxlen=RATE_WINDOW)
        self._gen: deque[tuple[int, float]] = deque(maxlen=RATE_WINDOW)

    def add(self, usage: dict[str, int], prefill_s: float | None, decode_s: float) -> None:
        """One answered request. A stream times its prefill (to the first token) and its
        decoding apart; a whole answer (`prefill_s` None) has one time for both, from
        which the prompt's share at the recent prompt rate is taken off, so a long prompt
        does not read as slow generation. With no prompt rate yet the whole time counts
        as decoding (a low figure, never a high one); a whole answer whose prompt alone
        should have taken longer than it did (a cached prompt) adds no generation
        sample."""
        prompt = usage.get("prompt_tokens", 0)
        if prefill_s is not None and prefill_s > 0:
            self._prompt.append((prompt, prefill_s))
        elif prefill_s is None and prompt and self._prompt:
            prompt_rate = self._rate(self._prompt)
            if prompt_rate:
                decode_s -= prompt / prompt_rate
                if decode_s <= 0:
                    return
        if decode_s > 0:
            self._gen.append((usage.get("completion_tokens", 0), decode_s))

    @staticmethod
    def _rate(samples: deque[tuple[int, float]]) -> float | None:
        seconds = sum(s for _, s in samples)
        return round(sum(n for n, _ in samples) / seconds, 1) if seconds else None

    def figures(self) -> dict[str, float | None]:
        return {
            "prompt_tokens_per_s": self._rate(self._prompt),
            "generation_tokens_per_s": self._rate(self._gen),
        }


class Backend:
    """One runtime serving a slot: a supervised runner, or a server already on the box."""

    def __init__(
        self,
        runtime: Runtime,
        runner: RunnerLike | None = None,
        spec: LlamaSpec | None = None,
        placement: Placement | None = None,
        instance: str = "",
    ) -> None:
        self.runtime, self.runner, self.spec, self.placement = runtime, runner, spec, placement
        self.instance = instance
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def ram_bytes(self) -> int:
        return self.placement.ram_bytes if self.placement else 0

    @property
    def vram_bytes(self) -> int:
        return self.placement.vram_bytes if self.placement else 0

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self.idle.set()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.stop()
        else:
            await self.runtime.aclose()


class Slot:
    """A public name: its backend, what to load on demand, its queue and its counters."""

    def __init__(
        self, name: str, kind: str, spec: LlamaSpec | None = None, keep_alive: float | None = None
    ) -> None:
        self.name, self.kind, self.spec, self.keep_alive = name, kind, spec, keep_alive
        self.backend: Backend | None = None
        self.prepared: Backend | None = None  # declared, started by ModelManager.start
        self.retiring: list[Backend] = []
        self.state = "unloaded"  # unloaded | loading | loaded | swapping | unloading
        self.ready: asyncio.Future[None] | None = None  # pending while not loaded
        self.queued = 0
        self.served = 0
        self.swaps = 0
        self.crashes_before = 0  # of runners no longer serving
        self.restarts_before = 0
        self.last_used: float | None = None
        self.rates = Rates()

    @property
    def in_flight(self) -> int:
        return sum(b.in_flight for b in [*([self.backend] if self.backend else []), *self.retiring])

    def gate(self) -> asyncio.Future[None]:
        if self.ready is None or self.ready.done():
            self.ready = asyncio.get_running_loop().create_future()
        return self.ready

    def open(self, backend: Backend, now: float) -> None:
        """Lend `backend` from now on; a model never used counts as used when loaded."""
        self.backend, self.state = backend, "loaded"
        self.last_used = now if self.last_used is None else self.last_used
        self.spec = backend.spec or self.spec
        ready, self.ready = self.ready, None
        if ready is not None and not ready.done():
            ready.set_result(None)

    def fail(self, error: OpenAIError) -> None:
        self.backend, self.state = None, "unloaded"
        ready, self.ready = self.ready, None
        if ready is not None and not ready.done():
            ready.set_exception(error)
            ready.exception()  # retrieved: nobody waiting is not an error

    def retire(self, backend: Backend) -> None:
        if backend.runner is not None:
            self.crashes_before += backend.runner.crashes
            self.restarts_before += backend.runner.restarts


class ManagerState:
    """The model manager's fields (set by ``ModelManager.__init__``) and its lock."""

    run_dir: Path
    budget: Budget
    inventory: Callable[[], Sequence[ModelFile]] | None
    factory: RunnerFactory
    clock: Callable[[], float]
    max_queue: int
    queue_timeout: float
    drain_timeout: float
    reap_period: float
    _slots: dict[str, Slot]
    _live: set[Backend]  # every backend holding memory
    _generation: int
    _lock: asyncio.Lock | None
    _tasks: set[asyncio.Task[Any]]
    _headers: dict[tuple[str, int, int], ModelFile]

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:  # made on the loop that runs the manager
            self._lock = asyncio.Lock()
        return self._lock

    def _load_on_demand(self, slot: Slot) -> None:
        """Start loading `slot` for the requests waiting on it (the manager's lending)."""
        raise NotImplementedError
