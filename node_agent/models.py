"""The model manager: which models this node serves, where they run, and how busy they are.

Names. Apps ask for a *public name* ("chat"). Each public name is one slot;
a slot is served by at most one runner at a time (plus, during a hot swap,
the old runner finishing what it already took). ``swap("chat", NEW)`` keeps
the name "chat" and changes what serves it: NEW is ``NAME=PATH.gguf``,
``PATH.gguf`` or a name (or family: every quantization of one model) in the
inventory; the NAME part only labels the file in :meth:`ModelManager.stats`
(``source``). To serve under a new name, ``load`` it. Each runner gets an
instance name ``{name}.{generation}`` for its socket and log.

Loading, unloading and swapping are serialized by one lock and decided inside
it, against the manager's own accounting: free memory is the :class:`Budget`
minus the estimates (:mod:`node_agent.placement`) of every runner held,
starting and draining ones included.

Requests borrow a runtime with ``async with manager.use(name)``. A slot
that is loaded lends at once. A slot that is loading, unloading or swapping
drain-first holds requests in a bounded queue: 503 when ``max_queue`` wait
already, 504 after ``queue_timeout`` s. An unloaded slot (evicted, expired
after its keep-alive) is loaded again by the first request for it.

Hot swap (:meth:`ModelManager.swap`): if the new model fits beside the old one
(evicting idle models least recently used first if needed), start it, wait
until it answers, send new requests to it, let the old runner drain (at most
``drain_timeout`` s), stop it. Otherwise, if it fits in place of the old one,
queue new requests, drain and stop the old runner, start the new one, let the
queue through; if the new one fails to start, the old one is started again.
If it fits neither way, refuse with the reason and change nothing.

The manager is in parts, one job each: this module declares, lends (the queue),
reaps and reports; :mod:`node_agent.manager_memory` places, evicts and starts and
stops runners; :mod:`node_agent.manager_commands` runs load, unload and swap;
:mod:`node_agent.model_names` names files; :mod:`node_agent.slots` holds the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from meshgate.openai import OpenAIError, unknown_model
from node_agent.inventory import ModelFile
from node_agent.manager_commands import ManagerCommands
from node_agent.model_names import model_name, parse_model_spec, scan_model_dirs
from node_agent.placement import Budget, measure_budget
from node_agent.runtimes.base import Runtime
from node_agent.slots import Backend, LlamaSpec, RunnerFactory, RunnerLike, Slot

if TYPE_CHECKING:
    from node_agent.runtimes.llama.supervisor import LlamaRunner

__all__ = [
    "LlamaSpec",
    "ModelManager",
    "RunnerFactory",
    "RunnerLike",
    "model_name",
    "parse_model_spec",
    "scan_model_dirs",
]

log = logging.getLogger(__name__)


def _default_factory(run_dir: Path) -> RunnerFactory:
    def make(
        name: str, instance: str, spec: LlamaSpec, path: Path, n_gpu_layers: int
    ) -> RunnerLike:
        from node_agent.runtimes.llama.supervisor import LlamaRunner  # deferred: httpx

        return LlamaRunner(
            name,
            path,
            run_dir=run_dir,
            instance=instance,
            n_ctx=spec.n_ctx,
            n_gpu_layers=n_gpu_layers,
            n_threads=spec.n_threads,
            ready_timeout=spec.ready_timeout,
        )

    return make


class ModelManager(ManagerCommands):
    """Declares, loads, swaps, evicts, stops and lends out this node's runtimes."""

    def __init__(
        self,
        *,
        run_dir: Path,
        budget: Budget | None = None,
        inventory: Callable[[], Sequence[ModelFile]] | None = None,
        runner_factory: RunnerFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_queue: int = 64,
        queue_timeout: float = 120.0,
        drain_timeout: float = 300.0,
        reap_period: float = 5.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.budget = budget if budget is not None else measure_budget()
        self.inventory = inventory
        self.factory = runner_factory or _default_factory(self.run_dir)
        self.clock = clock
        self.max_queue, self.queue_timeout = max_queue, queue_timeout
        self.drain_timeout, self.reap_period = drain_timeout, reap_period
        self._slots: dict[str, Slot] = {}
        self._live: set[Backend] = set()  # every backend holding memory
        self._generation = 0
        self._lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._headers: dict[tuple[str, int, int], ModelFile] = {}

    def _add(self, slot: Slot) -> None:
        if slot.name in self._slots:
            raise ValueError(f"model {slot.name!r} is declared twice")
        self._slots[slot.name] = slot

    def add_llama(self, name: str, path: Path | str, **opts: Any) -> LlamaRunner:
        """Serve a GGUF file with a supervised llama.cpp runner, started by :meth:`start`.

        opts: n_ctx, n_gpu_layers (None or absent: placement decides), n_threads,
        ready_timeout, keep_alive. Raises ValueError when it does not fit the budget.
        """
        if name in self._slots:
            raise ValueError(f"model {name!r} is declared twice")
        keep_alive = opts.pop("keep_alive", None)
        spec = LlamaSpec(str(path), Path(path), **opts)
        slot = Slot(name, "llama.cpp", spec, keep_alive)
        try:
            backend = self._prepare(slot, spec, self._place(name, spec, self._free()))
        except OpenAIError as exc:
            raise ValueError(exc.message) from None
        from node_agent.runtimes.llama.supervisor import LlamaRunner

        if not isinstance(backend.runner, LlamaRunner):
            raise TypeError("add_llama needs the default runner factory; use load()")
        self._add(slot)
        slot.prepared = backend
        self._live.add(backend)
        return backend.runner

    def declare(self, name: str, path: Path | str, **opts: Any) -> None:
        """Know `name` (a GGUF file) without loading it: it loads on its first request.

        For files that show up in a model directory while the node runs; opts as
        for :meth:`add_llama`. The coordinator sees the model as not loaded and may
        send a load command ahead of demand.
        """
        keep_alive = opts.pop("keep_alive", None)
        self._add(Slot(name, "llama.cpp", LlamaSpec(str(path), Path(path), **opts), keep_alive))

    async def remove(self, name: str) -> bool:
        """Forget `name` (its file or its Ollama model is gone): unload it, drain, 404 after.

        Requests waiting for it fail with a clear 404; False if it was not known.
        """
        async with self.lock:
            slot = self._slots.pop(name, None)
            if slot is None:
                return False
            slot.spec = None  # nothing to load on demand any more
            if slot.backend is not None and slot.backend.runner is not None:
                with contextlib.suppress(OpenAIError):  # "not loaded" for those queued
                    await self._unload(slot, why="removed")
            slot.fail(unknown_model(name, hop="node"))
            log.info("no longer serving %s", name)
            return True

    def add_upstream(self, name: str, base_url: str, upstream_model: str | None = None) -> None:
        """Serve `name` from an OpenAI-compatible server already on the box."""
        from node_agent.runtimes.openai_http import OpenAIHttpRuntime  # deferred: httpx

        runtime = OpenAIHttpRuntime(name, "upstream", base_url, upstream_model=upstream_model)
        self.add_runtime(runtime)

    def add_runtime(self, runtime: Runtime) -> None:
        """Serve any runtime (tests, Ollama, upstreams): always loaded, never evicted."""
        slot = Slot(runtime.name, runtime.kind)
        self._add(slot)
        slot.backend, slot.state = Backend(runtime), "loaded"

    async def start(self) -> None:
        """Start every declared runner at once; if one fails, stop the others and raise."""
        slots = [s for s in self._slots.values() if s.prepared is not None]
        results = await asyncio.gather(
            *(self._start(s.prepared) for s in slots if s.prepared), return_exceptions=True
        )
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            await self.stop()
            raise errors[0]
        for slot in slots:
            assert slot.prepared is not None
            slot.open(slot.prepared, self.clock())
            slot.prepared = None
        self._spawn(self._reap_forever())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        backends = set(self._live)
        for slot in self._slots.values():
            backends.update(b for b in (slot.backend, slot.prepared) if b is not None)
        await asyncio.gather(*(b.stop() for b in backends))
        self._live.clear()
        for slot in self._slots.values():
            if slot.ready is not None:
                slot.fail(OpenAIError(503, "the node is stopping", hop="node"))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def get(self, name: str) -> Runtime | None:
        slot = self._slots.get(name)
        return slot.backend.runtime if slot and slot.backend else None

    def names(self) -> list[str]:
        return sorted(self._slots)

    def serves(self, name: str) -> bool:
        """Whether `name` is known here (loaded or not): cheaper than `in names()`."""
        return name in self._slots

    def use(self, name: str) -> Lending:
        """Lend `name`'s runtime for one request (``async with``); 404 in OpenAI's shape if
        not served."""
        return Lending(self, name)

    def record(
        self, name: str, usage: dict[str, int], prefill_s: float | None, decode_s: float
    ) -> None:
        """One answered request's usage and timing, into `name`'s recent token rates."""
        slot = self._slots.get(name)
        if slot is not None:
            slot.rates.add(usage, prefill_s, decode_s)

    async def _admit(self, slot: Slot) -> Backend:
        """The slot's backend now, or after waiting in its bounded queue."""
        deadline = time.monotonic() + self.queue_timeout
        while True:
            if slot.state == "loaded" and slot.backend is not None:
                return slot.backend
            if slot.state == "unloaded":
                self._load_on_demand(slot)
            if slot.queued >= self.max_queue:
                raise OpenAIError(
                    503,
                    f"{slot.name} is {slot.state} and its queue is full "
                    f"({self.max_queue} waiting); retry later",
                    code="queue_full",
                    hop="node",
                )
            slot.queued += 1
            try:
                await asyncio.wait_for(
                    asyncio.shield(slot.gate()), max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                raise OpenAIError(
                    504,
                    f"waited {self.queue_timeout:g} s for {slot.name} ({slot.state}); giving up",
                    hop="node",
                ) from None
            finally:
                slot.queued -= 1

    def _load_on_demand(self, slot: Slot) -> None:
        if slot.spec is None:
            raise OpenAIError(503, f"{slot.name} is not loaded", hop="node")
        slot.state = "loading"
        slot.gate()
        self._spawn(self._load_waiting(slot))

    async def _load_waiting(self, slot: Slot) -> None:
        async with self.lock:
            if slot.state != "loading" or slot.spec is None:
                return
            try:
                slot.open(await self._bring_up(slot, slot.spec), self.clock())
            except OpenAIError as exc:
                log.warning("loading %s on demand failed: %s", slot.name, exc.message)
                slot.fail(exc)

    async def reap(self) -> list[str]:
        """Unload idle models whose keep-alive has run out; returns their names."""
        now, gone = self.clock(), []
        async with self.lock:
            for slot in list(self._slots.values()):
                idle = slot.state == "loaded" and not slot.in_flight and not slot.queued
                if (
                    idle
                    and slot.keep_alive is not None
                    and slot.backend is not None
                    and slot.backend.runner is not None
                    and now - (slot.last_used if slot.last_used is not None else now)
                    >= slot.keep_alive
                ):
                    await self._unload(slot, why=f"idle for {slot.keep_alive:g} s (keep-alive)")
                    gone.append(slot.name)
        return gone

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reap_period)
            await self.reap()

    def load_states(self) -> dict[str, dict[str, Any]]:
        """Per public name: state, in flight, queued (cheap: for the coordinator's deltas)."""
        return {name: {"state": slot.state, "in_flight": slot.in_flight, "queued": slot.queued}
                for name, slot in self._slots.items()}

    def stats(self) -> dict[str, Any]:
        """Per public name: state, runner, memory, load, rates, crashes, last use."""
        return {name: self._stats(slot) for name, slot in sorted(self._slots.items())}

    def _stats(self, slot: Slot) -> dict[str, Any]:
        b = slot.backend or slot.prepared
        runner = b.runner if b else None
        idle = None if slot.last_used is None else max(0.0, self.clock() - slot.last_used)
        return {
            "state": slot.state,
            "kind": slot.kind,
            "source": slot.spec.source if slot.spec else None,
            **(self._describe(b) if b else {"runner": None, "pid": None}),
            "rss_bytes": _rss(runner.pid) if runner and runner.pid else None,
            "runner_state": runner.state if runner else None,
            "in_flight": slot.in_flight,
            "queued": slot.queued,
            "served": slot.served,
            **slot.rates.figures(),
            "crashes": slot.crashes_before + (runner.crashes if runner else 0),
            "restarts": slot.restarts_before + (runner.restarts if runner else 0),
            "swaps": slot.swaps,
            "last_used": None if idle is None else round(time.time() - idle, 3),
            "idle_s": None if idle is None else round(idle, 3),
            "keep_alive_s": slot.keep_alive,
        }


def _rss(pid: int) -> int | None:
    with contextlib.suppress(psutil.Error):
        return int(psutil.Process(pid).memory_info().rss)
    return None


class Lending:
    """`ModelManager.use`'s block: the runtime lent on entry, given back on exit (a class,
    not an ``asynccontextmanager``: no generator to start, hook and close on every request)."""

    __slots__ = ("_backend", "_manager", "_name", "_slot")

    def __init__(self, manager: ModelManager, name: str) -> None:
        self._manager, self._name = manager, name
        self._slot: Slot | None = None
        self._backend: Backend | None = None

    async def __aenter__(self) -> Runtime:
        manager = self._manager
        slot = manager._slots.get(self._name)
        if slot is None:
            raise unknown_model(self._name, hop="node")
        backend = slot.backend
        if slot.state != "loaded" or backend is None:  # not ready: wait in its queue
            backend = await manager._admit(slot)
        backend.enter()
        slot.last_used = manager.clock()
        self._slot, self._backend = slot, backend
        return backend.runtime

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        slot, backend = self._slot, self._backend
        assert slot is not None
        assert backend is not None
        if exc_type is None:
            slot.served += 1
        backend.leave()
        slot.last_used = self._manager.clock()
