"""The model manager's commands: load, unload, swap (see :mod:`node_agent.models`).

:meth:`ManagerCommands.command` takes ``{"op": "load"|"unload"|"swap", ...}`` from the
local port's admin routes and the coordinator link's COMMAND frames, checks its fields
and runs it under the manager's lock.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from meshgate.openai import OpenAIError, unknown_model
from node_agent.manager_memory import MemoryPlanning
from node_agent.model_names import parse_model_spec
from node_agent.placement import Budget
from node_agent.slots import Backend, LlamaSpec, Slot

__all__ = ["ManagerCommands"]

log = logging.getLogger("node_agent.models")


class ManagerCommands(MemoryPlanning):
    """Load, unload and swap, decided against the manager's own accounting."""

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
