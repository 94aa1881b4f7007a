"""The node's energy meter: reads the box's devices and attributes joules to requests.

:class:`EnergyMeter` takes a reading of every source (NVML GPUs, RAPL CPU
packages) when a request begins, when one ends and every ``period`` seconds
(:meth:`EnergyMeter.run`, for long requests and for counter wraps), and
hands the readings to the pure :class:`~node_agent.energy.EnergyAttributor`.
A reading is a few NVML calls or sysfs reads, made inline; a box with no
readable device makes no reading at all. ``scripts/bench/energy.py`` measures
a request's begin+end: on a shared 2-vCPU VM, 19 us of CPU with two GPUs on the
FAKE NVML (our code, not a driver's call), 90 us with three RAPL zone files,
0.4 us with nothing to read.

``begin()`` returns a ticket; ``end(ticket)`` returns the request's
:class:`~node_agent.energy.Energy` (``end`` is idempotent: the tunnel asks
before its END frame, the metrics again when the request is recorded).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from node_agent.energy import DeviceReading, Energy, EnergyAttributor, Totals, Uses

__all__ = ["EnergyMeter", "EnergySource", "Ticket"]

log = logging.getLogger(__name__)

DEFAULT_PERIOD_S = 1.0
NOT_MEASURED = Energy(None)


class EnergySource(Protocol):
    def read(self) -> Sequence[DeviceReading]: ...


class _Nvml(Protocol):
    def energy(self) -> list[DeviceReading]: ...


class NvmlEnergy:
    """An :class:`EnergySource` over ``NvmlSource.energy``."""

    def __init__(self, nvml: _Nvml) -> None:
        self.nvml = nvml

    def read(self) -> Sequence[DeviceReading]:
        return self.nvml.energy()


class Ticket:
    """One request's place in the meter; `energy` is set once it ended."""

    __slots__ = ("energy", "key")

    def __init__(self, key: int) -> None:
        self.key = key
        self.energy: Energy | None = None


class EnergyMeter:
    def __init__(
        self,
        sources: Sequence[EnergySource],
        *,
        clock: Callable[[], float] = time.monotonic,
        period: float = DEFAULT_PERIOD_S,
        price_per_kwh: float | None = None,
    ) -> None:
        self.sources = list(sources)
        self.clock = clock
        self.period = period
        self.price_per_kwh = price_per_kwh
        self._attributor = EnergyAttributor()
        self._lock = threading.Lock()
        self._keys = itertools.count(1)
        first = self._read()
        self.devices = sorted({r.device for r in first if _readable(r)})
        if self.devices:
            with self._lock:
                self._attributor.observe(self.clock(), first)
            log.info("energy measured on %s", ", ".join(self.devices))
        else:
            log.info("energy not measured: no readable GPU energy counter, power or RAPL zone")

    @property
    def measuring(self) -> bool:
        return bool(self.devices)

    @property
    def totals(self) -> Totals:
        return self._attributor.totals

    def _read(self) -> list[DeviceReading]:
        out: list[DeviceReading] = []
        for source in self.sources:
            try:
                out.extend(source.read())
            except Exception:  # a meter never takes a request down
                log.exception("energy source %r failed", source)
        return out

    def begin(self, uses: Uses | None = None) -> Ticket:
        """A request starts, on the devices `uses` accepts (None: every device)."""
        ticket = Ticket(next(self._keys))
        if self.measuring:
            readings = self._read()
            with self._lock:
                self._attributor.start(ticket.key, self.clock(), readings, uses)
        return ticket

    def end(self, ticket: Ticket) -> Energy:
        """The request's energy from its begin to now (the first call decides it)."""
        if ticket.energy is not None:
            return ticket.energy
        if not self.measuring:
            ticket.energy = NOT_MEASURED
            return NOT_MEASURED
        readings = self._read()
        with self._lock:
            if ticket.energy is None:  # another thread may have ended it meanwhile
                ticket.energy = self._attributor.finish(ticket.key, self.clock(), readings)
        return ticket.energy

    def tick(self) -> None:
        if self.measuring:
            readings = self._read()
            with self._lock:
                self._attributor.observe(self.clock(), readings)

    def cost(self, energy: Energy) -> float | None:
        return energy.cost(self.price_per_kwh)

    async def run(self) -> None:
        """Until cancelled: a reading every period (nothing to do when nothing is measured)."""
        if not self.measuring:
            return
        while True:
            await asyncio.sleep(self.period)
            self.tick()


def _readable(reading: DeviceReading) -> bool:
    return reading.counter_j is not None or reading.power_w is not None
