"""GPU telemetry through NVML (``pynvml`` from the ``nvidia-ml-py`` package).

Rules, in the order the code applies them:

- The NVML module is a constructor argument; by default ``pynvml`` is imported
  lazily on the first sample, so a box without it still starts.
- No NVML (module missing, ``NVMLError_LibraryNotFound``,
  ``NVMLError_DriverNotLoaded``, any ``NVMLError`` from ``nvmlInit``): every
  sample is ``[]`` from then on, and the reason is logged once.
- An NVML error on one field of one GPU (``NVMLError_NotSupported`` for power
  on some boards, ``NVMLError_GPUIsLost`` mid-run): that field is ``None`` and
  named in ``GpuSample.unavailable``; the other fields and GPUs are still
  reported. Logged once per (GPU index, field).
- :meth:`NvmlSource.sample` never raises.

Fetching (calls into NVML) is kept apart from converting: :func:`gpu_sample`
turns one GPU's raw readings into a :class:`GpuSample` and is pure.

Energy (:meth:`NvmlSource.energy`, for ``energy_meter.py``): per GPU, NVML's
total energy counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules
since the driver loaded, Volta and later); where a GPU lacks it, its power
draw, which the meter integrates over time (an estimate). :func:`gpu_energy`
is the pure converter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

from node_agent.energy import DeviceReading

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU at one instant. A ``None`` field could not be read (see ``unavailable``)."""

    index: int
    name: str | None
    uuid: str | None
    vram_total_bytes: int | None
    vram_used_bytes: int | None
    vram_free_bytes: int | None
    gpu_util_pct: int | None
    mem_util_pct: int | None
    temperature_c: int | None
    power_draw_w: float | None
    power_limit_w: float | None
    pcie_gen_current: int | None
    pcie_gen_max: int | None
    pcie_width_current: int | None
    pcie_width_max: int | None
    pcie_tx_kb_s: int | None
    pcie_rx_kb_s: int | None
    unavailable: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["unavailable"] = list(self.unavailable)
        return d


# --- pure converters ---------------------------------------------------------


def decode_text(raw: str | bytes | None) -> str | None:
    """NVML strings arrive as ``str`` (pynvml >= 11.5) or ``bytes`` (older)."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="replace")
    return str(raw)


def milliwatts_to_watts(mw: int | None) -> float | None:
    return None if mw is None else mw / 1000.0


def _attr(obj: Any, name: str) -> int | None:
    return None if obj is None else int(getattr(obj, name))


def gpu_sample(index: int, raw: Mapping[str, Any]) -> GpuSample:
    """Convert the raw readings of one GPU (keys of :data:`READERS`, ``None`` = failed)."""
    memory, util = raw.get("memory"), raw.get("utilization")
    return GpuSample(
        index=index,
        name=decode_text(raw.get("name")),
        uuid=decode_text(raw.get("uuid")),
        vram_total_bytes=_attr(memory, "total"),
        vram_used_bytes=_attr(memory, "used"),
        vram_free_bytes=_attr(memory, "free"),
        gpu_util_pct=_attr(util, "gpu"),
        mem_util_pct=_attr(util, "memory"),
        temperature_c=_int(raw.get("temperature")),
        power_draw_w=milliwatts_to_watts(_int(raw.get("power_mw"))),
        power_limit_w=milliwatts_to_watts(_int(raw.get("power_limit_mw"))),
        pcie_gen_current=_int(raw.get("pcie_gen_current")),
        pcie_gen_max=_int(raw.get("pcie_gen_max")),
        pcie_width_current=_int(raw.get("pcie_width_current")),
        pcie_width_max=_int(raw.get("pcie_width_max")),
        pcie_tx_kb_s=_int(raw.get("pcie_tx_kb_s")),
        pcie_rx_kb_s=_int(raw.get("pcie_rx_kb_s")),
        unavailable=tuple(k for k in READERS if raw.get(k) is None),
    )


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def gpu_energy(index: int, energy_mj: int | None, power_mw: int | None) -> DeviceReading:
    """One GPU's energy reading: the counter in joules, else its power in watts."""
    return DeviceReading(
        f"gpu{index}",
        counter_j=None if energy_mj is None else int(energy_mj) / 1000.0,
        power_w=milliwatts_to_watts(_int(power_mw)),
    )


# --- fetching ----------------------------------------------------------------

Reader = Callable[[Any, Any], Any]

#: What is read from each GPU, as data: raw key -> call on (nvml module, handle).
READERS: dict[str, Reader] = {
    "name": lambda n, h: n.nvmlDeviceGetName(h),
    "uuid": lambda n, h: n.nvmlDeviceGetUUID(h),
    "memory": lambda n, h: n.nvmlDeviceGetMemoryInfo(h),
    "utilization": lambda n, h: n.nvmlDeviceGetUtilizationRates(h),
    "temperature": lambda n, h: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
    "power_mw": lambda n, h: n.nvmlDeviceGetPowerUsage(h),
    "power_limit_mw": lambda n, h: n.nvmlDeviceGetEnforcedPowerLimit(h),
    "pcie_gen_current": lambda n, h: n.nvmlDeviceGetCurrPcieLinkGeneration(h),
    "pcie_gen_max": lambda n, h: n.nvmlDeviceGetMaxPcieLinkGeneration(h),
    "pcie_width_current": lambda n, h: n.nvmlDeviceGetCurrPcieLinkWidth(h),
    "pcie_width_max": lambda n, h: n.nvmlDeviceGetMaxPcieLinkWidth(h),
    "pcie_tx_kb_s": lambda n, h: n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_TX_BYTES),
    "pcie_rx_kb_s": lambda n, h: n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_RX_BYTES),
}


def _read_energy(nvml: Any, handle: Any) -> Any:
    return nvml.nvmlDeviceGetTotalEnergyConsumption(handle)


def _handle_of(index: int) -> Callable[[Any], Any]:
    return lambda nvml: nvml.nvmlDeviceGetHandleByIndex(index)


def _bind(read: Reader, handle: Any) -> Callable[[Any], Any]:
    return lambda nvml: read(nvml, handle)


class NvmlSource:
    """Samples every NVIDIA GPU of this box; ``[]`` when there is none or no NVML."""

    def __init__(self, nvml: ModuleType | Any | None = None) -> None:
        self._nvml = nvml
        self._state = "new"  # new -> ready | unavailable -> closed
        self._logged: set[tuple[int, str]] = set()
        self.driver_version: str | None = None
        self.unavailable_reason: str | None = None

    def sample(self) -> list[GpuSample]:
        if self._state == "new":
            self._init()
        if self._state != "ready":
            return []
        count = self._call(-1, "count", lambda n: n.nvmlDeviceGetCount())
        return [self._sample_one(i) for i in range(int(count or 0))]

    def energy(self) -> list[DeviceReading]:
        """Each GPU's energy counter (or, lacking one, its power draw); never raises."""
        if self._state == "new":
            self._init()
        if self._state != "ready":
            return []
        count = self._call(-1, "count", lambda n: n.nvmlDeviceGetCount())
        out = []
        for i in range(int(count or 0)):
            handle = self._call(i, "handle", _handle_of(i))
            energy = power = None
            if handle is not None:
                energy = self._call(i, "energy_mj", _bind(_read_energy, handle))
                if energy is None:
                    power = self._call(i, "power_mw", _bind(READERS["power_mw"], handle))
            out.append(gpu_energy(i, energy, power))
        return out

    def close(self) -> None:
        if self._state == "ready":
            self._call(-1, "shutdown", lambda n: n.nvmlShutdown())
        self._state = "closed"

    def _init(self) -> None:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as exc:
                return self._give_up(f"pynvml not importable: {exc}")
            self._nvml = pynvml
        try:
            self._nvml.nvmlInit()
        except (self._nvml.NVMLError, OSError) as exc:
            return self._give_up(f"{type(exc).__name__}: {exc}")
        self._state = "ready"
        version = self._call(-1, "driver_version", lambda n: n.nvmlSystemGetDriverVersion())
        self.driver_version = decode_text(version)
        return None

    def _give_up(self, reason: str) -> None:
        self._state, self.unavailable_reason = "unavailable", reason
        log.warning("NVML unavailable, reporting no GPUs: %s", reason)

    def _sample_one(self, index: int) -> GpuSample:
        handle = self._call(index, "handle", lambda n: n.nvmlDeviceGetHandleByIndex(index))
        raw: dict[str, Any] = {}
        if handle is not None:
            for key, read in READERS.items():
                raw[key] = self._call(index, key, _bind(read, handle))
        return gpu_sample(index, raw)

    def _call(self, index: int, field: str, fn: Callable[[Any], Any]) -> Any:
        """Run one NVML call; on an NVML error return ``None`` and log once per (gpu, field)."""
        nvml = self._nvml
        assert nvml is not None
        try:
            return fn(nvml)
        except (nvml.NVMLError, OSError, AttributeError) as exc:
            if (index, field) not in self._logged:
                self._logged.add((index, field))
                where = "NVML" if index < 0 else f"GPU {index}"
                log.warning("%s: cannot read %s: %s: %s", where, field, type(exc).__name__, exc)
            return None
