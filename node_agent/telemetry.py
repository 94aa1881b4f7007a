"""Host telemetry from psutil, joined with GPU and runtime figures into one sample.

:func:`host_sample` is the pure converter (recorded psutil values in, a
:class:`HostSample` out); :class:`TelemetrySampler` fetches. A sample costs a
few syscalls and no sleep: CPU utilisation is ``psutil.cpu_percent`` with
``interval=None``, i.e. measured since the previous sample (the sampler primes
it on construction, so the first figure covers the time since then).

The period is the caller's business (the daemon calls :meth:`sample` every
``telemetry_period`` seconds). :meth:`TelemetrySampler.sample` never raises:
a missing model directory reads as ``None`` free bytes, no GPU as ``[]``, and a
failing ``runtime_stats`` callback as ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from node_agent.nvml import GpuSample

log = logging.getLogger(__name__)


class GpuSource(Protocol):
    def sample(self) -> list[GpuSample]: ...


@dataclass(frozen=True, slots=True)
class HostSample:
    cpu_count: int
    cpu_util_pct: float
    cpu_util_pct_per_core: tuple[float, ...]
    load_avg: tuple[float, float, float]
    mem_total_bytes: int
    mem_available_bytes: int
    swap_total_bytes: int
    swap_used_bytes: int
    disk_free_bytes: Mapping[str, int | None]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cpu_util_pct_per_core"] = list(self.cpu_util_pct_per_core)
        d["load_avg"] = list(self.load_avg)
        d["disk_free_bytes"] = dict(self.disk_free_bytes)
        return d


def host_sample(
    *,
    cpu_count: int | None,
    per_core_pct: Sequence[float],
    load_avg: Sequence[float],
    virtual_memory: Any,
    swap_memory: Any,
    disk_usage: Mapping[str, Any | None],
) -> HostSample:
    """Pure: psutil readings (or recorded ones with the same attributes) -> HostSample.

    Total utilisation is the mean of the per-core figures, so both come from one
    reading. ``cpu_count`` None (psutil could not tell) falls back to the cores seen.
    """
    cores = tuple(float(p) for p in per_core_pct)
    total = round(sum(cores) / len(cores), 1) if cores else 0.0
    one, five, fifteen = (float(x) for x in load_avg)
    return HostSample(
        cpu_count=int(cpu_count) if cpu_count else len(cores),
        cpu_util_pct=total,
        cpu_util_pct_per_core=cores,
        load_avg=(one, five, fifteen),
        mem_total_bytes=int(virtual_memory.total),
        mem_available_bytes=int(virtual_memory.available),
        swap_total_bytes=int(swap_memory.total),
        swap_used_bytes=int(swap_memory.used),
        disk_free_bytes={d: None if u is None else int(u.free) for d, u in disk_usage.items()},
    )


def read_host(model_dirs: Iterable[Path]) -> HostSample:
    """Fetch: read psutil now and convert."""
    disks: dict[str, Any | None] = {}
    for d in model_dirs:
        try:
            disks[str(d)] = psutil.disk_usage(str(d))
        except OSError:
            disks[str(d)] = None
    return host_sample(
        cpu_count=psutil.cpu_count(),
        per_core_pct=psutil.cpu_percent(interval=None, percpu=True),
        load_avg=psutil.getloadavg(),
        virtual_memory=psutil.virtual_memory(),
        swap_memory=psutil.swap_memory(),
        disk_usage=disks,
    )


class TelemetrySampler:
    """One call, one JSON/msgpack-ready sample: ``{"host", "gpus", "nvml", "runtime", "ts"}``."""

    def __init__(
        self,
        model_dirs: Sequence[Path],
        nvml_source: GpuSource | None,
        runtime_stats: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._model_dirs = [Path(d) for d in model_dirs]
        self._gpus = nvml_source
        self._runtime_stats = runtime_stats
        self._runtime_errors: set[str] = set()
        psutil.cpu_percent(interval=None, percpu=True)  # prime: next call measures from now

    def sample(self) -> dict[str, Any]:
        return {
            "host": read_host(self._model_dirs).to_dict(),
            "gpus": [g.to_dict() for g in self._gpus.sample()] if self._gpus else [],
            "nvml": self._nvml(),
            "runtime": self._runtime(),
            "ts": time.time(),
        }

    def _nvml(self) -> dict[str, Any]:
        """The driver version, or why there are no GPU figures (read after sampling)."""
        if self._gpus is None:
            return {"driver_version": None, "unavailable_reason": "no GPU source configured"}
        return {
            "driver_version": getattr(self._gpus, "driver_version", None),
            "unavailable_reason": getattr(self._gpus, "unavailable_reason", None),
        }

    def _runtime(self) -> dict[str, Any]:
        if self._runtime_stats is None:
            return {}
        try:
            return dict(self._runtime_stats())
        except Exception as exc:  # a bug in the stats callback must not stop telemetry
            kind = type(exc).__name__
            if kind not in self._runtime_errors:
                self._runtime_errors.add(kind)
                log.exception("runtime stats failed; reporting the error instead")
            return {"error": f"{kind}: {exc}"}


class TelemetryService:
    """Samples every ``period`` seconds off the event loop and keeps the latest sample.

    psutil and NVML calls run in a worker thread (``asyncio.to_thread``), so a
    slow driver never stalls requests; ``runtime_stats`` runs on the event loop
    (it reads the model manager, which only the loop changes) and
    ``runtime_extra`` in the thread (per-process figures such as runner RSS).
    """

    def __init__(
        self,
        sampler: TelemetrySampler,
        *,
        period: float = 2.0,
        runtime_stats: Callable[[], dict[str, Any]] | None = None,
        runtime_extra: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.sampler = sampler
        self.period = period
        self._runtime_stats = runtime_stats
        self._runtime_extra = runtime_extra
        self._latest: dict[str, Any] | None = None
        self.samples = 0

    def latest(self) -> dict[str, Any] | None:
        return self._latest

    async def refresh(self) -> dict[str, Any]:
        runtime = self._stats()
        sample = await asyncio.to_thread(self._sample_in_thread, runtime)
        self._latest = sample
        self.samples += 1
        return sample

    def _stats(self) -> dict[str, Any]:
        if self._runtime_stats is None:
            return {}
        try:
            return dict(self._runtime_stats())
        except Exception as exc:  # a stats bug must not stop telemetry
            log.exception("runtime stats failed")
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _sample_in_thread(self, runtime: dict[str, Any]) -> dict[str, Any]:
        sample = self.sampler.sample()
        if self._runtime_extra is not None:
            try:
                self._runtime_extra(runtime)
            except Exception:  # never let per-process figures stop the sample
                log.exception("runtime figures failed")
        sample["runtime"] = runtime
        return sample

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # keep sampling; the sampler itself never raises
                log.exception("telemetry sample failed")
            await asyncio.sleep(self.period)
