"""Check meshgate's NVML path on a real NVIDIA GPU; prints one JSON result.

    python3 scripts/gpu_check.py [--seconds 5] [--interval 0.25] [--busy-seconds 5] [--fake]

Needs only this repository plus ``nvidia-ml-py`` and ``psutil`` (no llama.cpp,
no GPU build of anything). It goes through the node's own code:

1. telemetry: ``node_agent.nvml.NvmlSource.sample()`` per GPU (name, UUID,
   VRAM, utilisation, temperature, power, PCIe generation/width) and which
   fields NVML refused;
2. energy: ``NvmlSource.energy()`` (``nvmlDeviceGetTotalEnergyConsumption``, mJ)
   read every ``--interval`` s for ``--seconds`` s while idle, beside power
   draw samples; per GPU: whether the counter moved, joules, and the mean
   power from the counter vs the sampled power (they should agree within a
   few watts);
3. the node's meter (``node_agent.energy_meter.EnergyMeter``) over the same
   window, with one synthetic request running for its middle third: what it
   was given, and the check ``attributed + idle == measured``;
4. a busy phase only if ``cupy`` or ``torch`` happens to be importable (a
   matmul loop for ``--busy-seconds``), else ``"busy": {"skipped": why}``;
5. RAPL (``/sys/class/powercap``) on the host, if readable.

``--fake`` runs the same path on the test suite's fake NVML (one H100 at a
recorded 71 W, energy counter moving with the clock), to check the script
itself on a box without a GPU. Exit status 0 when every GPU's counter (or
power, where a board lacks the counter) was read and moved, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node_agent.energy import DeviceReading
from node_agent.energy_meter import EnergyMeter, NvmlEnergy
from node_agent.nvml import NvmlSource
from node_agent.rapl import RaplSource


def _nvml_module(fake: bool) -> Any:
    if not fake:
        return None  # NvmlSource imports pynvml itself
    from tests.node.fake_nvml import h100_moving_energy

    return h100_moving_energy()


def sample_window(source: NvmlSource, seconds: float, interval: float) -> list[dict[str, Any]]:
    """Per GPU: counter and power over `seconds` of readings every `interval`."""
    series: list[tuple[float, list[DeviceReading], list[float | None]]] = []
    end = time.monotonic() + seconds
    while True:
        now = time.monotonic()
        power = [g.power_draw_w for g in source.sample()]
        series.append((now, source.energy(), power))
        if now >= end:
            break
        time.sleep(interval)
    (t0, first, _), (t1, last, _) = series[0], series[-1]
    out = []
    for i, (a, b) in enumerate(zip(first, last, strict=False)):
        watts = [p[i] for _, _, p in series if i < len(p) and p[i] is not None]
        entry: dict[str, Any] = {
            "device": a.device,
            "seconds": round(t1 - t0, 3),
            "readings": len(series),
            "counter_start_j": a.counter_j,
            "counter_end_j": b.counter_j,
            "mean_power_w_sampled": round(statistics.fmean(watts), 3) if watts else None,
        }
        if a.counter_j is not None and b.counter_j is not None:
            delta = b.counter_j - a.counter_j
            entry.update(
                delta_j=round(delta, 3),
                counter_moved=delta > 0,
                mean_power_w_from_counter=round(delta / (t1 - t0), 3) if t1 > t0 else None,
            )
        else:
            entry.update(delta_j=None, counter_moved=False, counter="not supported")
        out.append(entry)
    return out


def meter_window(source: NvmlSource, seconds: float) -> dict[str, Any]:
    """The node's meter over `seconds`, one synthetic request in the middle third."""
    meter = EnergyMeter([NvmlEnergy(source)], period=seconds / 6)
    third = seconds / 3
    time.sleep(third)
    ticket = meter.begin()
    time.sleep(third / 2)
    meter.tick()
    time.sleep(third / 2)
    energy = meter.end(ticket)
    time.sleep(third)
    meter.tick()
    totals = meter.totals
    return {
        "devices": meter.devices,
        "request_joules": None if energy.joules is None else round(energy.joules, 3),
        "request_estimated": energy.estimated,
        "measured_j": round(totals.measured_j, 3),
        "attributed_j": round(totals.attributed_j, 3),
        "idle_j": round(totals.idle_j, 3),
        "sums_to_measured": abs(totals.attributed_j + totals.idle_j - totals.measured_j) < 1e-6,
    }


def busy_window(source: NvmlSource, seconds: float) -> dict[str, Any]:
    """A matmul loop through cupy or torch, if either is here; energy before/after."""
    run = _busy_kernel()
    if isinstance(run, str):
        return {"skipped": run}
    before, t0 = source.energy(), time.monotonic()
    iterations = run(seconds)
    after, t1 = source.energy(), time.monotonic()
    return {
        "iterations": iterations,
        "seconds": round(t1 - t0, 3),
        "per_gpu_j": [_delta(a, b) for a, b in zip(before, after, strict=False)],
    }


def _delta(a: DeviceReading, b: DeviceReading) -> float | None:
    if a.counter_j is None or b.counter_j is None:
        return None
    return round(b.counter_j - a.counter_j, 3)


def _busy_kernel() -> Any:
    try:
        import cupy  # type: ignore[import-not-found]

        def with_cupy(seconds: float) -> int:
            x = cupy.random.random((4096, 4096), dtype=cupy.float32)
            n, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                x = x @ x
                x /= cupy.linalg.norm(x)
                cupy.cuda.Device().synchronize()
                n += 1
            return n

        return with_cupy
    except ImportError:
        pass
    try:
        import torch  # type: ignore[import-not-found]

        if not torch.cuda.is_available():
            return "torch is installed but sees no CUDA device"

        def with_torch(seconds: float) -> int:
            x = torch.rand((4096, 4096), device="cuda")
            n, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                x = x @ x
                x = x / x.norm()
                torch.cuda.synchronize()
                n += 1
            return n

        return with_torch
    except ImportError:
        return "neither cupy nor torch is installed: idle readings only"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--busy-seconds", type=float, default=5.0)
    parser.add_argument("--fake", action="store_true", help="the tests' fake NVML (no GPU)")
    args = parser.parse_args(argv)

    source = NvmlSource(_nvml_module(args.fake))
    started = time.time()
    gpus = [g.to_dict() for g in source.sample()]
    result: dict[str, Any] = {
        "host": platform.node(),
        "fake_nvml": args.fake,
        "started": started,
        "driver_version": source.driver_version,
        "nvml_unavailable": source.unavailable_reason,
        "gpus": gpus,
    }
    if gpus:
        result["energy_idle"] = sample_window(source, args.seconds, args.interval)
        result["meter"] = meter_window(source, args.seconds)
        result["busy"] = busy_window(source, args.busy_seconds)
    rapl = RaplSource()
    result["rapl"] = {
        "zones": [z.key + "=" + z.name for z in rapl.zones],
        "unavailable": rapl.unavailable_reason,
        "readings": [r.counter_j for r in rapl.read()],
    }
    idle = result.get("energy_idle") or []
    read = bool(idle) and all(
        e["counter_moved"] or e["mean_power_w_sampled"] is not None for e in idle
    )
    result["ok"] = read and bool(result.get("meter", {}).get("sums_to_measured"))
    source.close()
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
