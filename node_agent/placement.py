"""Where a model goes and what makes room for it: pure decisions, with their reasons.

The model manager asks, then acts; nothing here does I/O, logs or reads a clock.

- :class:`Budget` is the memory this box lends to models: RAM and VRAM left
  once the OS, the daemon and a headroom are set aside, measured once when the
  manager starts (:func:`measure_budget`, the only function here that reads
  the box) or given outright. What is *free* is the budget minus the estimates
  of the runners the manager holds, so a runner still loading counts in full.
- :func:`place` picks, among the files that hold one model (several
  quantizations), the best that fits and how many layers go to the GPU: wholly
  on the GPU beats split beats CPU only; within a placement, more bits per
  weight wins (:func:`node_agent.memory.choose_quantization`). A fixed
  ``n_gpu_layers`` is honoured as asked and only checked for fit.
- :func:`plan_eviction` frees memory by unloading idle models, least recently
  used first. A model with requests in flight or queued is never evicted;
  when even evicting every idle model would not do, it refuses and says why.
- :func:`family` names one model across its quantizations:
  ``llama-7b.Q4_K_M`` and ``llama-7b-Q8_0.gguf`` are both ``llama-7b``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from node_agent.inventory import ModelFile
from node_agent.memory import (
    RAM_HEADROOM_BYTES,
    VRAM_HEADROOM_BYTES,
    NotEstimable,
    choose_quantization,
    estimate_memory,
)

_QUANT_SUFFIX = re.compile(r"[.\-_](?:(?:I?Q\d(?:_[0-9A-Z]+)*)|F16|F32|BF16)$", re.IGNORECASE)


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


@dataclass(frozen=True, slots=True)
class Budget:
    """Bytes of RAM and VRAM for models (headroom already set aside)."""

    ram_bytes: int
    vram_bytes: int

    def minus(self, ram: int, vram: int) -> Budget:
        return Budget(self.ram_bytes - ram, self.vram_bytes - vram)

    def covers(self, ram: int, vram: int) -> bool:
        return ram <= self.ram_bytes and vram <= self.vram_bytes


def budget_from(available_ram: int, free_vram_per_gpu: Iterable[int | None]) -> Budget:
    """A budget from raw readings: available RAM and each GPU's free VRAM, less headroom.

    VRAM is summed over GPUs (llama.cpp splits layers across all of them by default).
    """
    vram = sum(max(0, (v or 0) - VRAM_HEADROOM_BYTES) for v in free_vram_per_gpu)
    return Budget(max(0, available_ram - RAM_HEADROOM_BYTES), vram)


def measure_budget(nvml: object | None = None, *, available_ram: int | None = None) -> Budget:
    """This box's budget now, from psutil and NVML (no NVML or no GPU: no VRAM)."""
    import psutil

    from node_agent.nvml import NvmlSource

    source = NvmlSource(nvml)
    try:
        gpus = source.sample()
    finally:
        source.close()
    ram = psutil.virtual_memory().available if available_ram is None else available_ram
    return budget_from(ram, [g.vram_free_bytes for g in gpus])


@dataclass(frozen=True, slots=True)
class Placement:
    """A file and its layers on the GPU, with the memory it takes; ``model`` None if refused."""

    model: ModelFile | None
    n_gpu_layers: int
    ram_bytes: int
    vram_bytes: int
    reason: str

    @property
    def fits(self) -> bool:
        return self.model is not None


def family(model: ModelFile) -> str:
    """The model's name without its quantization suffix."""
    name = model.name
    if model.quantization and name.lower().endswith(model.quantization.lower()):
        stripped = name[: -len(model.quantization)].rstrip(".-_")
        if stripped:
            return stripped
    return _QUANT_SUFFIX.sub("", name) or name


def candidates(wanted: str, models: Iterable[ModelFile]) -> list[ModelFile]:
    """The usable files named `wanted`, or else those of the family `wanted`."""
    usable = [m for m in models if m.usable]
    exact = [m for m in usable if m.name == wanted]
    return exact or [m for m in usable if family(m) == wanted]


def place(
    files: Sequence[ModelFile], n_ctx: int, free: Budget, *, n_gpu_layers: int | None = None
) -> Placement:
    """The best of `files` that fits `free` at `n_ctx`, and its GPU layers."""
    if not files:
        return Placement(None, 0, 0, 0, "no usable GGUF file to place")
    if n_gpu_layers is not None:
        return _place_fixed(files[0], n_ctx, free, n_gpu_layers)
    choice = choose_quantization(
        files,
        max(0, free.vram_bytes),
        max(0, free.ram_bytes),
        n_ctx=n_ctx,
        vram_headroom_bytes=0,
        ram_headroom_bytes=0,
    )
    if choice.model is None or choice.plan is None or choice.plan.estimate is None:
        return Placement(None, 0, 0, 0, choice.reason)
    e = choice.plan.estimate
    return Placement(choice.model, e.n_gpu_layers, e.host_bytes, e.gpu_bytes, choice.reason)


def _place_fixed(model: ModelFile, n_ctx: int, free: Budget, n_gpu_layers: int) -> Placement:
    try:
        first = estimate_memory(model, n_ctx)
        layers = first.n_layers if n_gpu_layers < 0 else min(n_gpu_layers, first.n_layers)
        e = estimate_memory(model, n_ctx, n_gpu_layers=layers)
    except NotEstimable as exc:
        return Placement(None, 0, 0, 0, str(exc))
    need = f"{gib(e.host_bytes)} RAM and {gib(e.gpu_bytes)} VRAM"
    have = f"{gib(max(0, free.ram_bytes))} RAM and {gib(max(0, free.vram_bytes))} VRAM free"
    if not free.covers(e.host_bytes, e.gpu_bytes):
        return Placement(
            None,
            0,
            0,
            0,
            f"{model.name} with {layers} GPU layers at n_ctx={n_ctx} needs {need}; {have}",
        )
    return Placement(
        model,
        layers,
        e.host_bytes,
        e.gpu_bytes,
        f"{layers} of {e.n_layers} layers on the GPU as asked ({need}; {have})",
    )


@dataclass(frozen=True, slots=True)
class Resident:
    """A loaded model as eviction sees it."""

    name: str
    ram_bytes: int
    vram_bytes: int
    busy: int  # requests in flight or queued
    last_used: float


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    fits: bool
    evict: tuple[str, ...]
    reason: str


def reclaimable(free: Budget, residents: Iterable[Resident], protect: Iterable[str] = ()) -> Budget:
    """What would be free once every idle, unprotected resident is gone."""
    kept = set(protect)
    idle = [r for r in residents if not r.busy and r.name not in kept]
    return free.minus(-sum(r.ram_bytes for r in idle), -sum(r.vram_bytes for r in idle))


def plan_eviction(
    need_ram: int,
    need_vram: int,
    free: Budget,
    residents: Sequence[Resident],
    *,
    protect: Iterable[str] = (),
) -> EvictionPlan:
    """The least recently used idle residents to unload so that the need fits `free`."""
    if free.covers(need_ram, need_vram):
        return EvictionPlan(True, (), "fits without evicting anything")
    kept = set(protect)
    idle = sorted(
        (r for r in residents if not r.busy and r.name not in kept),
        key=lambda r: (r.last_used, r.name),
    )
    chosen: list[str] = []
    for r in idle:
        free = free.minus(-r.ram_bytes, -r.vram_bytes)
        chosen.append(r.name)
        if free.covers(need_ram, need_vram):
            return EvictionPlan(
                True,
                tuple(chosen),
                f"evicting idle {', '.join(chosen)} (least recently used first)",
            )
    busy = [f"{r.name} ({r.busy} in flight or queued)" for r in residents if r.busy]
    held = [r.name for r in residents if not r.busy and r.name in kept]
    why = (
        f"needs {gib(need_ram)} RAM and {gib(need_vram)} VRAM; even after evicting every "
        f"idle model {gib(max(0, free.ram_bytes))} RAM and {gib(max(0, free.vram_bytes))} "
        "VRAM would be free"
    )
    if busy:
        why += f"; busy, never evicted: {', '.join(busy)}"
    if held:
        why += f"; kept: {', '.join(held)}"
    return EvictionPlan(False, (), why)
