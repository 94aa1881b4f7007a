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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import psutil

from meshgate.openai import OpenAIError, unknown_model
from node_agent.inventory import ModelFile, read_model_file
from node_agent.placement import (
    Budget,
    Placement,
    Resident,
    candidates,
    measure_budget,
    place,
    plan_eviction,
    reclaimable,
)
from node_agent.runtimes.base import RunnerError, Runtime
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

_SHARD = re.compile(r"-(\d{5})-of-(\d{5})$")


def parse_model_spec(spec: str) -> tuple[str, Path]:
    """``NAME=PATH.gguf`` (or just ``PATH.gguf``, named by its stem) -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    name, path = name.strip(), path.strip()
    if not path.endswith(".gguf"):
        raise ValueError(f"model spec {spec!r}: expected NAME=PATH.gguf")
    return name or model_name(Path(path)), Path(path).expanduser()


def model_name(path: Path) -> str:
    """The name a GGUF file is served under: its stem, without a shard suffix."""
    return _SHARD.sub("", path.stem)


def scan_model_dirs(dirs: Iterable[Path]) -> list[tuple[str, Path]]:
    """Every ``*.gguf`` under `dirs` as (name, path); the first of a name wins.

    Of a split model only the first shard is listed (llama.cpp finds the rest).
    """
    found: dict[str, Path] = {}
    for directory in dirs:
        for path in sorted(Path(directory).expanduser().rglob("*.gguf")):
            shard = _SHARD.search(path.stem)
            if shard and int(shard.group(1)) != 1:
                continue
            found.setdefault(model_name(path), path)
    return list(found.items())


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


def _no_room(name: str, why: str) -> OpenAIError:
    return OpenAIError(503, f"cannot load {name}: {why}", code="insufficient_memory", hop="node")


class ModelManager:
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

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:  # made on the loop that runs the manager
            self._lock = asyncio.Lock()
        return self._lock

    # --- declaring (before start) ----------------------------------------------------

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

    # --- lending -----------------------------------------------------------------------

    def get(self, name: str) -> Runtime | None:
        slot = self._slots.get(name)
        return slot.backend.runtime if slot and slot.backend else None

    def names(self) -> list[str]:
        return sorted(self._slots)

    def serves(self, name: str) -> bool:
        """Whether `name` is known here (loaded or not): cheaper than `in names()`."""
        return name in self._slots

    @asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[Runtime]:
        """Lend `name`'s runtime for one request; 404 in OpenAI's shape if not served."""
        slot = self._slots.get(name)
        if slot is None:
            raise unknown_model(name, hop="node")
        backend = await self._admit(slot)
        backend.enter()
        slot.last_used = self.clock()
        try:
            yield backend.runtime
            slot.served += 1
        finally:
            backend.leave()
            slot.last_used = self.clock()

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

    # --- memory ------------------------------------------------------------------------

    def _free(self) -> Budget:
        return self.budget.minus(
            sum(b.ram_bytes for b in self._live), sum(b.vram_bytes for b in self._live)
        )

    def _residents(self) -> list[Resident]:
        return [
            Resident(
                s.name,
                s.backend.ram_bytes,
                s.backend.vram_bytes,
                s.in_flight + s.queued,
                s.last_used or 0.0,
            )
            for s in self._slots.values()
            if s.state == "loaded" and s.backend is not None and s.backend.runner is not None
        ]

    def _files(self, spec: LlamaSpec) -> list[ModelFile]:
        if spec.path is not None:
            if not spec.path.is_file():
                raise OpenAIError(400, f"no such model file: {spec.path}", hop="node")
            model = self._read(spec.path)
            if not model.usable:
                raise OpenAIError(
                    400, f"{spec.path} is not a usable GGUF file: {model.reason}", hop="node"
                )
            return [model]
        found = candidates(spec.source, self.inventory() if self.inventory else [])
        if not found:
            raise OpenAIError(
                400,
                f"no model or family named {spec.source!r} in the inventory; give NAME=PATH.gguf",
                hop="node",
            )
        return found

    def _read(self, path: Path) -> ModelFile:
        """The file's metadata, read once per (path, size, mtime)."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._headers:
            self._headers[key] = read_model_file(path, st)
        return self._headers[key]

    def _place(self, name: str, spec: LlamaSpec, free: Budget) -> Placement:
        placement = place(self._files(spec), spec.n_ctx, free, n_gpu_layers=spec.n_gpu_layers)
        if not placement.fits:
            raise _no_room(name, placement.reason)
        return placement

    async def _make_room(
        self,
        name: str,
        spec: LlamaSpec,
        *,
        extra: Budget = Budget(0, 0),
        protect: Iterable[str] = (),
    ) -> Placement:
        """Place `spec`, evicting idle models least recently used first if it must.

        A victim that took a request since the plan was made is not evicted: plan again.
        """
        files = self._files(spec)
        while True:
            free = self._free().minus(-extra.ram_bytes, -extra.vram_bytes)
            placement = place(files, spec.n_ctx, free, n_gpu_layers=spec.n_gpu_layers)
            if placement.fits:
                return placement
            residents = [r for r in self._residents() if r.name != name]
            most = reclaimable(free, residents, protect)
            placement = place(files, spec.n_ctx, most, n_gpu_layers=spec.n_gpu_layers)
            if not placement.fits:
                self._refuse(name, spec, files, free, residents=residents, reason=placement.reason)
            plan = plan_eviction(
                placement.ram_bytes, placement.vram_bytes, free, residents, protect=protect
            )
            if not plan.fits:
                raise _no_room(name, plan.reason)
            log.info("to load %s: %s", name, plan.reason)
            for victim in map(self._slots.__getitem__, plan.evict):
                if victim.in_flight or victim.queued or victim.state != "loaded":
                    break
                await self._unload(victim, why=f"evicted to make room for {name}")
            else:
                return placement

    @staticmethod
    def _refuse(
        name: str,
        spec: LlamaSpec,
        files: list[ModelFile],
        free: Budget,
        *,
        residents: list[Resident],
        reason: str,
    ) -> NoReturn:
        """Say why: if busy models are what stands in the way, name them."""
        everything = free.minus(
            -sum(r.ram_bytes for r in residents), -sum(r.vram_bytes for r in residents)
        )
        if any(r.busy for r in residents):
            p = place(files, spec.n_ctx, everything, n_gpu_layers=spec.n_gpu_layers)
            if p.fits:
                reason = plan_eviction(p.ram_bytes, p.vram_bytes, free, residents).reason
        raise _no_room(name, reason)

    # --- acting ------------------------------------------------------------------------

    def _prepare(self, slot: Slot, spec: LlamaSpec, placement: Placement) -> Backend:
        assert placement.model is not None
        self._generation += 1
        instance = f"{slot.name}.{self._generation}"
        runner = self.factory(
            slot.name, instance, spec, Path(placement.model.path), placement.n_gpu_layers
        )
        return Backend(runner.runtime, runner, spec, placement, instance)

    async def _start(self, backend: Backend) -> None:
        assert backend.runner is not None
        self._live.add(backend)
        try:
            await backend.runner.start()
        except RunnerError as exc:
            self._live.discard(backend)
            raise OpenAIError(502, f"{exc}", code="runner_failed", hop="node") from None
        except BaseException:  # cancelled: leave no process behind
            self._live.discard(backend)
            await backend.stop()
            raise

    async def _bring_up(
        self,
        slot: Slot,
        spec: LlamaSpec,
        *,
        extra: Budget = Budget(0, 0),
        protect: Iterable[str] = (),
    ) -> Backend:
        placement = await self._make_room(slot.name, spec, extra=extra, protect=protect)
        backend = self._prepare(slot, spec, placement)
        await self._start(backend)
        log.info(
            "loaded %s from %s: %s",
            slot.name,
            placement.model and placement.model.path,
            placement.reason,
        )
        return backend

    async def _retire(self, slot: Slot, backend: Backend) -> None:
        """Let `backend` finish what it took (at most drain_timeout), then stop it."""
        slot.retiring.append(backend)
        try:
            await asyncio.wait_for(backend.idle.wait(), self.drain_timeout)
        except TimeoutError:
            log.warning(
                "%s: %d requests still running after %g s; stopping the runner anyway",
                backend.instance,
                backend.in_flight,
                self.drain_timeout,
            )
        finally:
            slot.retire(backend)
            await backend.stop()
            slot.retiring.remove(backend)
            self._live.discard(backend)

    async def _unload(self, slot: Slot, *, why: str) -> None:
        """Close the slot to new requests, drain and stop its runner; waiters reload it."""
        backend = slot.backend
        if backend is None or slot.state != "loaded":
            return
        slot.state, slot.backend = "unloading", None
        slot.gate()
        log.info("unloading %s: %s", slot.name, why)
        await self._retire(slot, backend)
        slot.state = "unloaded"
        if slot.queued:
            self._load_on_demand(slot)

    # --- commands ----------------------------------------------------------------------

    def _spec(self, source: str, base: LlamaSpec | None, **opts: Any) -> LlamaSpec:
        given = {k: v for k, v in opts.items() if v is not None}
        keep = base or LlamaSpec(source)
        fixed_layers = "n_gpu_layers" in given
        if source.endswith(".gguf"):
            try:
                label, path = parse_model_spec(source)
            except ValueError as exc:
                raise OpenAIError(400, str(exc), hop="node") from None
            spec = replace(keep, source=f"{label}={path}", path=path)
        else:
            spec = replace(keep, source=source, path=None)
        if not fixed_layers:
            spec = replace(spec, n_gpu_layers=None)
        return replace(spec, **given)

    async def load(
        self,
        name: str,
        source: str | None = None,
        *,
        n_ctx: int | None = None,
        n_gpu_layers: int | None = None,
        keep_alive: float | None = None,
        runtime_keep_alive: float | str | None = None,
    ) -> dict[str, Any]:
        """Load `name` (from `source`, or what it was declared with), evicting idle models.

        A model served by a runtime the manager does not run as a process (Ollama,
        an upstream) is asked to load itself, with `runtime_keep_alive` as given
        (Ollama's duration).
        """
        async with self.lock:
            slot = self._slots.get(name)
            if slot is not None and slot.backend is not None and slot.backend.runner is None:
                await slot.backend.runtime.load(runtime_keep_alive)
                return {"model": name, "loaded": True, "state": slot.state}
            if slot is not None and slot.state == "loaded":
                if source is not None and slot.spec and source != slot.spec.source:
                    raise OpenAIError(
                        409,
                        f"{name} is loaded from {slot.spec.source}; use swap to change it",
                        hop="node",
                    )
                return {"model": name, "loaded": False, "state": slot.state}
            if slot is None and source is None:
                raise unknown_model(name, hop="node")
            target = slot or Slot(name, "llama.cpp", None, keep_alive)
            base = target.spec
            spec = (
                self._spec(source, base, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers) if source else base
            )
            if spec is None:
                raise OpenAIError(
                    400, f"{name} has nothing to load from; give a source", hop="node"
                )
            if keep_alive is not None:
                target.keep_alive = keep_alive
            target.state = "loading"
            target.gate()
            try:
                backend = await self._bring_up(target, spec, protect={name})
            except OpenAIError as exc:
                target.fail(exc)
                raise
            self._slots.setdefault(name, target)
            target.open(backend, self.clock())
            return {"model": name, "loaded": True, **self._describe(backend)}

    async def unload(self, name: str) -> dict[str, Any]:
        """Drain and stop `name`'s runner; it stays known and loads again on demand."""
        async with self.lock:
            slot = self._slots.get(name)
            if slot is None:
                raise unknown_model(name, hop="node")
            if slot.backend is not None and slot.backend.runner is None:
                await slot.backend.runtime.unload()  # Ollama unloads; others refuse
                return {"model": name, "state": slot.state}
            if slot.backend is None:
                raise OpenAIError(400, f"{name} is {slot.state}; nothing to unload", hop="node")
            await self._unload(slot, why="asked")
            return {"model": name, "state": slot.state}

    async def swap(
        self, old: str, new: str, *, n_ctx: int | None = None, n_gpu_layers: int | None = None
    ) -> dict[str, Any]:
        """Serve `old`'s public name from `new` without dropping a request (see the module doc)."""
        began = time.monotonic()
        async with self.lock:
            slot = self._slots.get(old)
            if slot is None:
                raise unknown_model(old, hop="node")
            if slot.spec is None:
                raise OpenAIError(
                    400,
                    f"{old} is served by {slot.kind}, not a local runner; "
                    "only llama.cpp models are swapped",
                    hop="node",
                )
            spec = self._spec(new, slot.spec, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers)
            current = slot.backend if slot.state == "loaded" else None
            if current is None:
                mode = "load"
                slot.state = "loading"
                slot.gate()
                try:
                    slot.open(await self._bring_up(slot, spec, protect={old}), self.clock())
                except OpenAIError as exc:
                    slot.fail(exc)
                    raise
            elif self._fits_beside(old, spec):
                mode, fresh = "overlap", await self._bring_up(slot, spec, protect={old})
                slot.open(fresh, self.clock())
            else:
                mode = "drain-first"
                await self._swap_in_place(slot, current, spec)
            slot.swaps += 1
            assert slot.backend is not None
            result: dict[str, Any] = {
                "model": old,
                "mode": mode,
                "to": self._describe(slot.backend),
                "from": self._describe(current) if current else None,
            }
        if mode == "overlap" and current is not None:
            await self._retire(slot, current)  # new requests already go to the new runner
        result["seconds"] = round(time.monotonic() - began, 3)
        log.info("swapped %s (%s) in %.2f s", old, mode, result["seconds"])
        return result

    def _fits_beside(self, old: str, spec: LlamaSpec) -> bool:
        most = reclaimable(self._free(), [r for r in self._residents() if r.name != old])
        return place(self._files(spec), spec.n_ctx, most, n_gpu_layers=spec.n_gpu_layers).fits

    async def _swap_in_place(self, slot: Slot, current: Backend, spec: LlamaSpec) -> None:
        """Queue new requests, drain and stop the old runner, start the new one."""
        freed = Budget(current.ram_bytes, current.vram_bytes)
        self._place_or_refuse(slot.name, spec, freed)  # refuse before touching anything
        slot.state, slot.backend = "swapping", None
        slot.gate()
        await self._retire(slot, current)
        try:
            fresh = await self._bring_up(slot, spec, protect={slot.name})
        except OpenAIError as exc:
            log.warning(
                "swap of %s failed (%s); starting the old model again", slot.name, exc.message
            )
            assert current.spec is not None
            try:
                slot.open(
                    await self._bring_up(slot, current.spec, protect={slot.name}), self.clock()
                )
            except OpenAIError as again:
                slot.fail(again)
            raise
        slot.open(fresh, self.clock())

    def _place_or_refuse(self, name: str, spec: LlamaSpec, extra: Budget) -> None:
        free = self._free().minus(-extra.ram_bytes, -extra.vram_bytes)
        most = reclaimable(free, [r for r in self._residents() if r.name != name])
        self._place(name, spec, most)

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

    async def command(self, body: Any) -> dict[str, Any]:
        """Run ``{"op": "load"|"unload"|"swap", ...}`` (proxy admin routes, link COMMAND)."""
        if not isinstance(body, dict):
            raise OpenAIError(400, "a command is a JSON object with an 'op'", hop="node")
        op = body.get("op")
        if op not in ("swap", "load", "unload"):
            raise OpenAIError(
                400, f"unknown op {op!r}; expected load, unload or swap", param="op", hop="node"
            )
        model = _field(body, "model", str)
        n_ctx = _field(body, "n_ctx", int, required=False)
        layers = _field(body, "n_gpu_layers", int, required=False)
        if n_ctx is not None and not 16 <= n_ctx <= 1 << 20:
            raise OpenAIError(
                400, f"'n_ctx' {n_ctx} is out of range (16 to 1048576)", param="n_ctx", hop="node"
            )
        if op == "swap":
            return await self.swap(model, _field(body, "to", str), n_ctx=n_ctx, n_gpu_layers=layers)
        if op == "load":
            keep = _field(body, "keep_alive", float, required=False)
            if keep is not None and keep < 0:
                raise OpenAIError(
                    400, "'keep_alive' must be >= 0 seconds", param="keep_alive", hop="node"
                )
            return await self.load(
                model,
                _field(body, "from", str, required=False),
                n_ctx=n_ctx,
                n_gpu_layers=layers,
                keep_alive=keep,
            )
        return await self.unload(model)

    # --- reporting ---------------------------------------------------------------------

    @staticmethod
    def _describe(backend: Backend) -> dict[str, Any]:
        p, runner = backend.placement, backend.runner
        return {
            "runner": backend.instance or None,
            "pid": runner.pid if runner else None,
            "file": p.model.path if p and p.model else None,
            "quantization": p.model.quantization if p and p.model else None,
            "n_ctx": backend.spec.n_ctx if backend.spec else None,
            "n_gpu_layers": p.n_gpu_layers if p else None,
            "memory_estimate_bytes": backend.ram_bytes,
            "vram_estimate_bytes": backend.vram_bytes,
            "placement": p.reason if p else None,
        }

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


def _field(body: dict[str, Any], key: str, kind: type, *, required: bool = True) -> Any:
    value = body.get(key)
    if value is None:
        if required:
            raise OpenAIError(400, f"missing '{key}'", param=key, hop="node")
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value):
        what = "non-empty string" if kind is str else kind.__name__
        raise OpenAIError(400, f"'{key}' must be a {what}", param=key, hop="node")
    return value
