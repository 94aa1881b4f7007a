"""What energy metering adds to each request on the node.

    .venv/bin/python scripts/bench/energy.py [--requests 2000] [--json OUT]

Every request served here takes one energy reading as it begins and one as it
ends (``EnergyMeter.begin``/``end``: read every source, attribute the interval).
This measures the wall and CPU time of one begin+end pair, side by side in one
run, for:

- no meter source readable (this box's real ``pynvml`` without a driver, and no
  RAPL): the floor, what a CPU box without RAPL pays;
- the FAKE NVML with two recorded RTX 4090s: our code path around NVML, not a
  real driver's call cost (a real ``nvmlDeviceGetTotalEnergyConsumption`` is a
  driver ioctl; run this on a GPU box for that figure);
- a fake powercap tree in a temporary directory with two packages and a DRAM
  zone: real file reads of ``energy_uj``, as on a box with readable RAPL;
- both at once, with 8 requests overlapping (the attribution splits each
  interval among them).

Measured 2026-11-26 on the shared 2-vCPU VM (no GPU; load average ~24 from other
jobs, so wall times are inflated; CPU times are the figures to compare),
``.venv/bin/python scripts/bench/energy.py`` (2000 requests per case):

    case                                         devices  wall us/req  cpu us/req
    nothing readable (real pynvml, no RAPL)            0         0.42        0.42
    fake NVML, 2 GPUs                                  2         71.6       19.26
    RAPL files, 3 zones                                3       399.33       89.98
    NVML 2 GPUs + RAPL 3 zones                         5       539.04      111.83
    NVML 2 GPUs + RAPL 3 zones, 8 overlapping          5       593.42      118.44
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from node_agent.energy_meter import EnergyMeter, EnergySource, NvmlEnergy
from node_agent.nvml import NvmlSource
from node_agent.rapl import RaplSource
from tests.node.fake_nvml import FakeNvml, load_fixture


def powercap(root: Path) -> Path:
    for key, name, value in (("intel-rapl:0", "package-0", 1_000_000),
                             ("intel-rapl:0:2", "dram", 200_000),
                             ("intel-rapl:1", "package-1", 3_000_000)):
        zone = root / key
        zone.mkdir(parents=True)
        (zone / "name").write_text(name + "\n")
        (zone / "energy_uj").write_text(f"{value}\n")
        (zone / "max_energy_range_uj").write_text("262143328850\n")
    return root


def measure(make: Callable[[], list[EnergySource]], requests: int, overlap: int) -> dict[str, Any]:
    meter = EnergyMeter(make())
    held = [meter.begin() for _ in range(overlap - 1)]  # others running alongside
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(requests):
        meter.end(meter.begin())
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    for ticket in held:
        meter.end(ticket)
    return {"devices": len(meter.devices), "overlap": overlap,
            "wall_us_per_request": round(wall / requests * 1e6, 2),
            "cpu_us_per_request": round(cpu / requests * 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    gpus = load_fixture("nvml_rtx4090_x2.json")
    with tempfile.TemporaryDirectory() as tmp:
        tree = powercap(Path(tmp) / "powercap")
        cases: dict[str, Callable[[], list[EnergySource]]] = {
            "nothing readable (real pynvml, no RAPL)": lambda: [
                NvmlEnergy(NvmlSource()), RaplSource(Path(tmp) / "absent")],
            "fake NVML, 2 GPUs": lambda: [NvmlEnergy(NvmlSource(FakeNvml(gpus)))],
            "RAPL files, 3 zones": lambda: [RaplSource(tree)],
            "NVML 2 GPUs + RAPL 3 zones": lambda: [
                NvmlEnergy(NvmlSource(FakeNvml(gpus))), RaplSource(tree)],
        }
        results = {name: measure(make, args.requests, 1) for name, make in cases.items()}
        results["NVML 2 GPUs + RAPL 3 zones, 8 overlapping"] = measure(
            cases["NVML 2 GPUs + RAPL 3 zones"], args.requests, 8)
    print(f"{'case':44} {'devices':>7} {'wall us/req':>12} {'cpu us/req':>11}")
    for name, r in results.items():
        print(f"{name:44} {r['devices']:>7} {r['wall_us_per_request']:>12} "
              f"{r['cpu_us_per_request']:>11}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
