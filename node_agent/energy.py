"""Energy per request: what the box's meters measured, shared among the requests running.

Pure: readings and times go in, joules per request come out; nothing here
reads a device (``energy_sources.py`` does) or a clock (the caller passes
``t``). The rules:

- A device is read as a cumulative counter (NVML's total energy, RAPL's
  ``energy_uj``): the energy of an interval is the difference of two readings,
  across one wrap where the counter has a range (RAPL's
  ``max_energy_range_uj``). That is **measured**.
- A device without a counter but with a power reading (an older GPU) gets
  the trapezoid of its two power readings times the interval. That is
  **estimated**, and every request that received some of it says so.
- A device with neither, or a counter that went backwards without a range
  (a driver reload), gives nothing for that interval: never a made-up number.
- The caller takes a reading whenever a request starts or finishes (and on a
  period, for long requests and counter wraps), so between two readings the
  set of running requests is constant: each interval's joules on a device
  are split equally among the requests running through it that use that
  device (a request may name the devices it uses, e.g. only the CPU's for a
  model with no layer on a GPU; by default every device); an interval with
  none of them running is idle energy, nobody's.
- Hence, at any time: ``attributed + idle == measured`` (what :class:`Totals`
  keeps), which the tests check.

A request on a box where nothing could be read has ``joules = None`` ("not
measured"), not 0.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

__all__ = [
    "DeviceReading",
    "Energy",
    "EnergyAttributor",
    "Totals",
    "counter_delta",
    "interval_energy",
    "joules_cost",
]

JOULES_PER_KWH = 3.6e6


@dataclass(frozen=True, slots=True)
class DeviceReading:
    """One device at one instant. ``None``: that quantity could not be read."""

    device: str
    """A stable name: ``gpu0`` (NVML index), ``rapl:intel-rapl:0`` (powercap zone)."""
    counter_j: float | None = None
    """A cumulative energy counter, in joules."""
    wrap_j: float | None = None
    """The counter's range: past it, it starts again from 0. ``None``: it never wraps."""
    power_w: float | None = None
    """Power draw now, used only where there is no counter."""


@dataclass(frozen=True, slots=True)
class Energy:
    """What one request was given. ``joules is None``: nothing was measured for it."""

    joules: float | None
    estimated: bool = False
    """Some of it came from power x time rather than an energy counter."""

    def cost(self, price_per_kwh: float | None) -> float | None:
        return joules_cost(self.joules, price_per_kwh)


def joules_cost(joules: float | None, price_per_kwh: float | None) -> float | None:
    """Joules at an electricity price per kWh; ``None`` when either is unknown."""
    if joules is None or price_per_kwh is None:
        return None
    return joules / JOULES_PER_KWH * price_per_kwh


def counter_delta(prev: float, cur: float, wrap: float | None) -> float | None:
    """The counter's increase from `prev` to `cur`; ``None`` when it cannot be known."""
    if cur >= prev:
        return cur - prev
    if wrap is not None and wrap > 0 and prev <= wrap:
        return cur + (wrap - prev)  # it went past its range once
    return None  # went backwards with no range: reset (driver reload), not a wrap


def interval_energy(
    prev: DeviceReading, cur: DeviceReading, seconds: float
) -> tuple[float | None, bool]:
    """(joules between two readings of one device, estimated?)."""
    if prev.counter_j is not None and cur.counter_j is not None:
        wrap = cur.wrap_j if cur.wrap_j is not None else prev.wrap_j
        return counter_delta(prev.counter_j, cur.counter_j, wrap), False
    if prev.power_w is not None and cur.power_w is not None and seconds >= 0:
        return (prev.power_w + cur.power_w) / 2 * seconds, True
    return None, False


#: Which devices a request uses, by device name (``gpu0``, ``rapl:intel-rapl:0``).
Uses = Callable[[str], bool]


def cpu_only(device: str) -> bool:
    """A request that runs on the CPU alone: the CPU's meters (RAPL), no GPU."""
    return device.startswith("rapl:")


@dataclass
class _Account:
    joules: float = 0.0
    measured: bool = False
    estimated: bool = False
    uses: Uses | None = None  # None: every device

    def energy(self) -> Energy:
        return Energy(self.joules if self.measured else None, self.estimated)


@dataclass
class Totals:
    """Since the attributor was made: every joule measured, and where it went."""

    measured_j: float = 0.0
    attributed_j: float = 0.0
    idle_j: float = 0.0
    estimated_j: float = 0.0
    by_device: dict[str, float] = field(default_factory=dict)


class EnergyAttributor:
    """Splits each interval's energy among the requests running through it (see module doc).

    Not thread-safe; ``EnergyMeter`` holds the lock.
    """

    def __init__(self) -> None:
        self._last: dict[str, DeviceReading] = {}
        self._last_t: float | None = None
        self._running: dict[Hashable, _Account] = {}
        self.totals = Totals()
        self.ever_measured = False

    @property
    def running(self) -> int:
        return len(self._running)

    def observe(self, t: float, readings: Iterable[DeviceReading]) -> None:
        """Close the interval since the last reading at time `t` (seconds, monotonic)."""
        seconds = 0.0 if self._last_t is None else max(0.0, t - self._last_t)
        running = list(self._running.values())
        for cur in readings:
            prev = self._last.get(cur.device)
            self._last[cur.device] = cur
            if prev is None:
                continue
            joules, estimated = interval_energy(prev, cur, seconds)
            if joules is None:
                continue
            device = cur.device
            accounts = [a for a in running if a.uses is None or a.uses(device)]
            self._count(device, joules, estimated, accounts)
        self._last_t = t

    def _count(
        self, device: str, joules: float, estimated: bool, accounts: list[_Account]
    ) -> None:
        totals = self.totals
        self.ever_measured = True
        totals.measured_j += joules
        totals.by_device[device] = totals.by_device.get(device, 0.0) + joules
        if estimated:
            totals.estimated_j += joules
        if not accounts:
            totals.idle_j += joules
            return
        share = joules / len(accounts)
        for account in accounts:
            account.joules += share
            account.measured = True
            account.estimated = account.estimated or estimated
        totals.attributed_j += joules

    def start(
        self, key: Hashable, t: float, readings: Iterable[DeviceReading], uses: Uses | None = None
    ) -> None:
        """`key` starts running at `t` (readings taken at `t`) on the devices `uses` accepts
        (None: all of them)."""
        self.observe(t, readings)
        if key in self._running:
            raise KeyError(f"request {key!r} is already running")
        self._running[key] = _Account(uses=uses)

    def finish(self, key: Hashable, t: float, readings: Iterable[DeviceReading]) -> Energy:
        """`key` stops at `t`: what it was given over its whole run."""
        self.observe(t, readings)
        return self._running.pop(key).energy()

    def so_far(self, key: Hashable) -> Energy:
        """What a running request has been given up to the last reading."""
        return self._running[key].energy()
