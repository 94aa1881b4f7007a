"""The model manager's memory rules and runner lifecycle: place, evict, start, drain, stop.

Free memory is the :class:`~node_agent.placement.Budget` minus the estimates of every
runner held (starting and draining ones included); :meth:`MemoryPlanning._make_room`
evicts idle models least recently used first when a model does not fit, and says which
busy models stand in the way when eviction cannot help. Mixed into
:class:`~node_agent.models.ModelManager`, whose module doc tells the whole story.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from meshgate.openai import OpenAIError
from node_agent.inventory import ModelFile, read_model_file
from node_agent.placement import (
    Budget,
    Placement,
    Resident,
    candidates,
    place,
    plan_eviction,
    reclaimable,
)
from node_agent.runtimes.base import RunnerError
from node_agent.slots import Backend, LlamaSpec, ManagerState, Slot

__all__ = ["MemoryPlanning", "no_room"]

log = logging.getLogger("node_agent.models")


def no_room(name: str, why: str) -> OpenAIError:
    return OpenAIError(503, f"cannot load {name}: {why}", code="insufficient_memory", hop="node")


class MemoryPlanning(ManagerState):
    """Placement, eviction and the start and stop of runners (the manager's lock held)."""

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
            raise no_room(name, placement.reason)
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
                raise no_room(name, plan.reason)
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
        raise no_room(name, reason)

    def _fits_beside(self, old: str, spec: LlamaSpec) -> bool:
        most = reclaimable(self._free(), [r for r in self._residents() if r.name != old])
        return place(self._files(spec), spec.n_ctx, most, n_gpu_layers=spec.n_gpu_layers).fits

    def _place_or_refuse(self, name: str, spec: LlamaSpec, extra: Budget) -> None:
        free = self._free().minus(-extra.ram_bytes, -extra.vram_bytes)
        most = reclaimable(free, [r for r in self._residents() if r.name != name])
        self._place(name, spec, most)

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
