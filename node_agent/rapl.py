"""CPU energy through Linux powercap RAPL (``/sys/class/powercap/intel-rapl:*``).

Each zone directory has ``name`` (``package-0``, ``dram``, ``core``, ``psys``),
``energy_uj`` (a counter in microjoules) and ``max_energy_range_uj`` (where the
counter wraps to 0). AMD CPUs appear under the same ``intel-rapl`` names.

Which zones count (:func:`select_zones`, pure): every ``package-N`` zone plus
``dram`` zones (DRAM is not inside a package's figure); ``core``/``uncore`` are
inside their package and would count twice. ``psys`` (the whole platform,
packages included) is used alone, and only where there is no package zone.

Since 2020 most kernels make ``energy_uj`` readable by root only: a zone that
cannot be read is left out, with the reason logged once, and a box where none
can be read has no CPU meter ("not measured"), never a guess.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from node_agent.energy import DeviceReading

log = logging.getLogger(__name__)

POWERCAP = Path("/sys/class/powercap")
_ZONE = re.compile(r"^intel-rapl(:\d+)+$")


@dataclass(frozen=True, slots=True)
class Zone:
    key: str  # the directory name: intel-rapl:0, intel-rapl:0:2
    name: str  # what the zone says it is: package-0, dram, psys
    path: Path
    wrap_j: float | None


# --- pure -------------------------------------------------------------------------


def parse_uj(text: str) -> int:
    """A powercap counter file's text as microjoules; ValueError when it is not one."""
    value = int(text.strip())
    if value < 0:
        raise ValueError(f"negative energy counter {value}")
    return value


def select_zones(names: Mapping[str, str]) -> list[str]:
    """The zone directories whose counters add up without counting anything twice.

    `names` maps a zone directory (``intel-rapl:0``) to its ``name`` file."""
    zones = {k: v.strip() for k, v in names.items() if _ZONE.match(k)}
    packages = [k for k, v in zones.items() if v.startswith("package")]
    dram = [k for k, v in zones.items() if v == "dram"]
    if packages:
        return sorted(packages + dram)
    psys = [k for k, v in zones.items() if v == "psys"]
    return sorted(psys[:1] + dram) if psys else sorted(dram)


def reading(zone: Zone, energy_text: str | None) -> DeviceReading:
    """One zone's reading from its ``energy_uj`` text (``None``: could not be read)."""
    counter = None
    if energy_text is not None:
        try:
            counter = parse_uj(energy_text) / 1e6
        except ValueError:
            counter = None
    return DeviceReading(f"rapl:{zone.key}", counter_j=counter, wrap_j=zone.wrap_j)


# --- fetching ---------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


class RaplSource:
    """The readable RAPL zones of this box; :meth:`read` never raises."""

    def __init__(self, root: Path = POWERCAP) -> None:
        self.root = root
        self.zones: list[Zone] = []
        self.unavailable_reason: str | None = None
        self._logged: set[str] = set()
        self._discover()

    def _discover(self) -> None:
        try:
            dirs = [p for p in self.root.iterdir() if _ZONE.match(p.name)]
        except OSError as exc:
            self.unavailable_reason = f"no powercap tree at {self.root}: {exc.strerror}"
            return
        names = {p.name: _read(p / "name") or "" for p in dirs}
        unreadable: list[str] = []
        for key in select_zones(names):
            path = self.root / key
            try:
                (path / "energy_uj").read_text()
            except OSError as exc:
                unreadable.append(f"{key}/energy_uj: {exc.strerror or exc}")
                continue
            wrap_text = _read(path / "max_energy_range_uj")
            try:
                wrap = parse_uj(wrap_text) / 1e6 if wrap_text is not None else None
            except ValueError:
                wrap = None
            self.zones.append(Zone(key, names[key].strip(), path, wrap))
        if not self.zones:
            why = "; ".join(unreadable) if unreadable else "no RAPL package zone"
            self.unavailable_reason = f"RAPL not readable under {self.root}: {why}"
            log.info("CPU energy not measured: %s", self.unavailable_reason)
        elif unreadable:
            log.warning("RAPL zones left out (not readable): %s", "; ".join(unreadable))

    def read(self) -> list[DeviceReading]:
        out = []
        for zone in self.zones:
            text = _read(zone.path / "energy_uj")
            if text is None and zone.key not in self._logged:
                self._logged.add(zone.key)
                log.warning("RAPL zone %s stopped being readable", zone.key)
            out.append(reading(zone, text))
        return out
