"""Energy readings (a fake powercap tree, a fake NVML with a moving counter) and the meter."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from node_agent.energy import DeviceReading
from node_agent.energy_meter import EnergyMeter, NvmlEnergy
from node_agent.nvml import NvmlSource, gpu_energy
from node_agent.rapl import RaplSource, parse_uj, select_zones
from tests.node.fake_nvml import FakeNvml, load_fixture

H100 = load_fixture("nvml_h100_80gb_hbm3.json")
RTX4090X2 = load_fixture("nvml_rtx4090_x2.json")
RANGE_UJ = 262143328850


def zone(root: Path, key: str, name: str, energy_uj: int, max_uj: int = RANGE_UJ) -> Path:
    path = root / key
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


def powercap(tmp_path: Path) -> Path:
    """Two sockets with core/uncore/dram subzones and a psys, as a server shows them."""
    root = tmp_path / "powercap"
    (root / "intel-rapl").mkdir(parents=True)  # the control type: no counter
    zone(root, "intel-rapl:0", "package-0", 1_000_000)
    zone(root, "intel-rapl:0:0", "core", 500_000)
    zone(root, "intel-rapl:0:1", "dram", 200_000)
    zone(root, "intel-rapl:1", "package-1", 7_000_000)
    zone(root, "intel-rapl:2", "psys", 9_000_000)
    return root


def set_uj(root: Path, key: str, value: int) -> None:
    (root / key / "energy_uj").write_text(f"{value}\n")


# --- RAPL -------------------------------------------------------------------------


def test_select_zones_counts_packages_and_dram_once() -> None:
    names = {"intel-rapl:0": "package-0", "intel-rapl:0:0": "core", "intel-rapl:0:1": "uncore",
             "intel-rapl:0:2": "dram", "intel-rapl:1": "psys", "intel-rapl": "", "other": "x"}
    assert select_zones(names) == ["intel-rapl:0", "intel-rapl:0:2"]
    assert select_zones({"intel-rapl:0": "psys"}) == ["intel-rapl:0"]  # a laptop: psys alone
    assert select_zones({"intel-rapl:0:0": "core"}) == []


def test_parse_uj() -> None:
    assert parse_uj("123456\n") == 123456
    for bad in ("", "abc", "-5"):
        with pytest.raises(ValueError):
            parse_uj(bad)


def test_rapl_reads_the_selected_zones_in_joules_with_their_range(tmp_path: Path) -> None:
    root = powercap(tmp_path)
    source = RaplSource(root)
    assert [z.key for z in source.zones] == ["intel-rapl:0", "intel-rapl:0:1", "intel-rapl:1"]
    readings = {r.device: r for r in source.read()}
    assert readings["rapl:intel-rapl:0"].counter_j == 1.0
    assert readings["rapl:intel-rapl:1"].counter_j == 7.0
    assert readings["rapl:intel-rapl:0"].wrap_j == pytest.approx(262143.32885)


def test_rapl_wraparound_through_the_meter(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    zone(root, "intel-rapl:0", "package-0", RANGE_UJ - 2_000_000)  # 2 J before the wrap
    now = [0.0]
    meter = EnergyMeter([RaplSource(root)], clock=lambda: now[0])
    ticket = meter.begin()
    set_uj(root, "intel-rapl:0", 3_000_000)  # wrapped, then 3 J more
    now[0] = 1.0
    assert meter.end(ticket).joules == pytest.approx(5.0)


def test_unreadable_rapl_is_not_measured_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "powercap"
    counter = zone(root, "intel-rapl:0", "package-0", 5) / "energy_uj"
    if os.geteuid() == 0:  # root reads a mode-000 file: fail the read another way
        counter.unlink()
        counter.mkdir()
    else:
        counter.chmod(0)  # what most kernels since 2020 do to non-root readers
    with caplog.at_level(logging.INFO):
        source = RaplSource(root)
    assert source.zones == []
    assert source.unavailable_reason is not None
    assert "energy_uj" in source.unavailable_reason


def test_no_powercap_tree_is_not_measured(tmp_path: Path) -> None:
    source = RaplSource(tmp_path / "absent")
    assert source.read() == []
    assert "no powercap tree" in (source.unavailable_reason or "")
    meter = EnergyMeter([source])
    assert not meter.measuring
    assert meter.end(meter.begin()).joules is None


def test_a_zone_that_stops_being_readable_gives_nothing_for_it(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    zone(root, "intel-rapl:0", "package-0", 5_000_000)
    source = RaplSource(root)
    (root / "intel-rapl:0" / "energy_uj").unlink()
    assert source.read() == [DeviceReading("rapl:intel-rapl:0", None, RANGE_UJ / 1e6)]


# --- NVML ---------------------------------------------------------------------------


def test_gpu_energy_converter() -> None:
    assert gpu_energy(1, 123456, None) == DeviceReading("gpu1", counter_j=123.456)
    assert gpu_energy(0, None, 71234) == DeviceReading("gpu0", power_w=71.234)


def test_fake_nvml_counter_moves_with_power_over_time() -> None:
    fake = FakeNvml(H100)
    source = NvmlSource(fake)
    [before] = source.energy()
    fake.advance(10.0)
    [after] = source.energy()
    assert before.counter_j is not None
    assert after.counter_j == pytest.approx(before.counter_j + 712.34, abs=0.002)  # 71.234 W


def test_gpu_without_a_counter_falls_back_to_power() -> None:
    fake = FakeNvml(RTX4090X2)
    fake.unsupported(1, "nvmlDeviceGetTotalEnergyConsumption")
    busy, idle = NvmlSource(fake).energy()
    assert busy.counter_j is not None
    assert busy.power_w is None
    assert (idle.counter_j, idle.power_w) == (None, pytest.approx(18.532))


def test_meter_on_two_gpus_splits_fairly_and_sums_to_the_measured_total() -> None:
    fake = FakeNvml(RTX4090X2)  # 402.117 W and 18.532 W
    meter = EnergyMeter([NvmlEnergy(NvmlSource(fake))], clock=lambda: fake.now)
    assert meter.devices == ["gpu0", "gpu1"]
    fake.advance(1.0)  # idle: nobody's
    a = meter.begin()
    fake.advance(2.0)
    b = meter.begin()
    fake.advance(1.0)
    meter.tick()
    fake.set_power(0, 200_000)
    fake.advance(1.0)
    energy_a = meter.end(a)
    fake.advance(3.0)
    energy_b = meter.end(b)
    watts = 402.117 + 18.532
    assert energy_a.joules == pytest.approx(2 * watts + 0.5 * watts + 0.5 * (200 + 18.532), 1e-5)
    assert energy_b.joules == pytest.approx(0.5 * watts + 0.5 * (200 + 18.532)
                                            + 3 * (200 + 18.532), 1e-5)
    assert not energy_a.estimated
    totals = meter.totals
    assert totals.idle_j == pytest.approx(watts, 1e-5)
    assert (energy_a.joules or 0) + (energy_b.joules or 0) + totals.idle_j == pytest.approx(
        totals.measured_j)
    assert meter.end(a) is energy_a  # idempotent: decided once


def test_meter_estimates_from_power_on_a_gpu_without_a_counter() -> None:
    fake = FakeNvml(H100)
    fake.unsupported(0, "nvmlDeviceGetTotalEnergyConsumption")
    meter = EnergyMeter([NvmlEnergy(NvmlSource(fake))], clock=lambda: fake.now,
                        price_per_kwh=0.36)
    ticket = meter.begin()
    fake.advance(100.0)
    energy = meter.end(ticket)
    assert energy.estimated
    assert energy.joules == pytest.approx(7123.4)
    assert meter.cost(energy) == pytest.approx(7123.4 / 3.6e6 * 0.36)


def test_meter_with_no_nvml_library_is_not_measured() -> None:
    meter = EnergyMeter([NvmlEnergy(NvmlSource(FakeNvml(H100, library_missing=True)))])
    assert meter.devices == []
    assert meter.end(meter.begin()).joules is None


def test_a_failing_source_never_takes_the_request_down() -> None:
    class Broken:
        def read(self) -> list[DeviceReading]:
            raise RuntimeError("sensor on fire")

    fake = FakeNvml(H100)
    meter = EnergyMeter([NvmlEnergy(NvmlSource(fake)), Broken()], clock=lambda: fake.now)
    ticket = meter.begin()
    fake.advance(1.0)
    assert meter.end(ticket).joules == pytest.approx(71.234, abs=0.002)
