"""A FAKE NVML module for tests: there is no GPU on the test machine.

:class:`FakeNvml` stands where the ``pynvml`` module would: it has pynvml's
real function names (``nvmlInit``, ``nvmlDeviceGetMemoryInfo``, ...), its
real constants, and raises pynvml's real error classes (``pynvml.NVMLError``
built from an ``NVML_ERROR_*`` code maps to ``NVMLError_NotSupported`` and
friends), so code that catches them behaves as on a real box. Its GPUs come
from recorded readings in ``tests/node/fixtures/nvml_*.json``.

Cues: ``FakeNvml(..., library_missing=True)`` fails ``nvmlInit`` with
``NVMLError_LibraryNotFound``; :meth:`FakeNvml.unsupported` makes one call on
one GPU raise ``NVMLError_NotSupported``; :meth:`FakeNvml.lose_gpu` makes
every call on one GPU raise (``NVMLError_GPUIsLost`` by default).

Energy: ``nvmlDeviceGetTotalEnergyConsumption`` is a moving counter (mJ) that
integrates each GPU's power draw over the fake's clock: by default a manual
clock moved by :meth:`FakeNvml.advance`, or any ``clock`` given (a daemon
subprocess uses ``time.monotonic``, see :func:`h100_moving_energy`).
:meth:`FakeNvml.set_power` changes a GPU's draw from now on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml

FIXTURES = Path(__file__).parent / "fixtures"

# pynvml's own error classes and constants, re-exported as the module has them.
NVMLError = pynvml.NVMLError
NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
NVMLError_NotSupported = pynvml.NVMLError_NotSupported
NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
NVML_PCIE_UTIL_TX_BYTES = pynvml.NVML_PCIE_UTIL_TX_BYTES
NVML_PCIE_UTIL_RX_BYTES = pynvml.NVML_PCIE_UTIL_RX_BYTES


@dataclass
class FakeMemory:  # the shape of pynvml.c_nvmlMemory_t
    total: int
    free: int
    used: int


@dataclass
class FakeUtilization:  # the shape of pynvml.c_nvmlUtilization_t
    gpu: int
    memory: int


@dataclass(frozen=True)
class FakeHandle:
    index: int


def load_fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


class FakeNvml:
    """A fake of the ``pynvml`` module, configured with recorded GPUs."""

    NVMLError = NVMLError
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_PCIE_UTIL_TX_BYTES = NVML_PCIE_UTIL_TX_BYTES
    NVML_PCIE_UTIL_RX_BYTES = NVML_PCIE_UTIL_RX_BYTES

    def __init__(
        self,
        fixture: dict[str, Any] | None = None,
        *,
        library_missing: bool = False,
        clock: Callable[[], float] | None = None,
    ):
        fixture = fixture or {"driver_version": "", "gpus": []}
        self.gpus: list[dict[str, Any]] = [dict(g) for g in fixture["gpus"]]
        self.now = 0.0
        self._clock = clock or (lambda: self.now)
        start = self._clock()
        #: per GPU: (energy counter in mJ, clock time it was brought up to)
        self._energy = [(float(g.get("energy_mj", 0)), start) for g in self.gpus]
        self.driver_version: str = fixture["driver_version"]
        self.library_missing = library_missing
        self.init_calls = 0
        self.initialized = False
        self._unsupported: set[tuple[int, str]] = set()
        self._lost: dict[int, int] = {}

    # --- cues ----------------------------------------------------------------
    def unsupported(self, index: int, function: str) -> None:
        """Make ``function`` (a pynvml name) raise NotSupported on GPU ``index``."""
        if not hasattr(self, function):
            raise AttributeError(f"pynvml has no {function} in this fake")
        self._unsupported.add((index, function))

    def advance(self, seconds: float) -> None:
        """Move the manual clock (the default one) on."""
        self.now += seconds

    def set_power(self, index: int, milliwatts: int) -> None:
        """GPU `index` draws `milliwatts` from now on (its energy so far is kept)."""
        self._energy_now(index)
        self.gpus[index]["power_usage_mw"] = milliwatts

    def _energy_now(self, index: int) -> float:
        counter, since = self._energy[index]
        now = self._clock()
        counter += max(0.0, now - since) * float(self.gpus[index]["power_usage_mw"])  # mW*s = mJ
        self._energy[index] = (counter, now)
        return counter

    def lose_gpu(self, index: int, code: int = pynvml.NVML_ERROR_GPU_IS_LOST) -> None:
        self._lost[index] = code

    # --- the module's functions -------------------------------------------------
    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.library_missing:
            raise NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._check_init()
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check_init()
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._check_init()
        if not 0 <= index < len(self.gpus):
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return FakeHandle(index)

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return str(self._gpu(handle, "nvmlDeviceGetName")["name"])

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        return str(self._gpu(handle, "nvmlDeviceGetUUID")["uuid"])

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: Any = None) -> FakeMemory:
        return FakeMemory(**self._gpu(handle, "nvmlDeviceGetMemoryInfo")["memory"])

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> FakeUtilization:
        return FakeUtilization(**self._gpu(handle, "nvmlDeviceGetUtilizationRates")["utilization"])

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTemperature")
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(gpu["temperature"])

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return int(self._gpu(handle, "nvmlDeviceGetPowerUsage")["power_usage_mw"])

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        self._gpu(handle, "nvmlDeviceGetTotalEnergyConsumption")
        return int(self._energy_now(handle.index))

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return int(self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit")["enforced_power_limit_mw"])

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: FakeHandle) -> int:
        return int(self._pcie(handle, "nvmlDeviceGetCurrPcieLinkGeneration")["gen_current"])

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: FakeHandle) -> int:
        return int(self._pcie(handle, "nvmlDeviceGetMaxPcieLinkGeneration")["gen_max"])

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: FakeHandle) -> int:
        return int(self._pcie(handle, "nvmlDeviceGetCurrPcieLinkWidth")["width_current"])

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: FakeHandle) -> int:
        return int(self._pcie(handle, "nvmlDeviceGetMaxPcieLinkWidth")["width_max"])

    def nvmlDeviceGetPcieThroughput(self, handle: FakeHandle, counter: int) -> int:
        pcie = self._pcie(handle, "nvmlDeviceGetPcieThroughput")
        if counter == NVML_PCIE_UTIL_TX_BYTES:
            return int(pcie["tx_kb_s"])
        if counter == NVML_PCIE_UTIL_RX_BYTES:
            return int(pcie["rx_kb_s"])
        raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    # --- helpers -----------------------------------------------------------------
    def _check_init(self) -> None:
        if not self.initialized:
            raise NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: FakeHandle, function: str) -> dict[str, Any]:
        self._check_init()
        if handle.index in self._lost:
            raise NVMLError(self._lost[handle.index])
        if (handle.index, function) in self._unsupported:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self.gpus[handle.index]

    def _pcie(self, handle: FakeHandle, function: str) -> dict[str, Any]:
        return dict(self._gpu(handle, function)["pcie"])


def rtx4090_x2_power_unsupported() -> FakeNvml:
    """Two recorded RTX 4090s, power draw unreadable on GPU 1: for a daemon subprocess,
    ``MESHGATE_NVML_MODULE=tests.node.fake_nvml:rtx4090_x2_power_unsupported``."""
    nvml = FakeNvml(load_fixture("nvml_rtx4090_x2.json"))
    nvml.unsupported(1, "nvmlDeviceGetPowerUsage")
    return nvml


def h100_moving_energy() -> FakeNvml:
    """One recorded H100 whose energy counter moves with the real clock at its recorded 71 W.

    For a daemon subprocess:
    ``MESHGATE_NVML_MODULE=tests.node.fake_nvml:h100_moving_energy``."""
    return FakeNvml(load_fixture("nvml_h100_80gb_hbm3.json"), clock=time.monotonic)
