"""NVML telemetry: pure converters on recorded readings, the fetch path on a fake NVML."""

from __future__ import annotations

import logging

import pynvml
import pytest

from node_agent.nvml import READERS, GpuSample, NvmlSource, decode_text, gpu_sample
from tests.node.fake_nvml import FakeMemory, FakeNvml, FakeUtilization, load_fixture

H100 = load_fixture("nvml_h100_80gb_hbm3.json")
RTX4090X2 = load_fixture("nvml_rtx4090_x2.json")


def raw_readings(gpu: dict[str, object]) -> dict[str, object]:
    """A recorded fixture GPU as the raw values NVML hands back."""
    pcie = gpu["pcie"]
    assert isinstance(pcie, dict)
    return {
        "name": str(gpu["name"]).encode(),  # older pynvml returns bytes
        "uuid": gpu["uuid"],
        "memory": FakeMemory(**gpu["memory"]),  # type: ignore[arg-type]
        "utilization": FakeUtilization(**gpu["utilization"]),  # type: ignore[arg-type]
        "temperature": gpu["temperature"],
        "power_mw": gpu["power_usage_mw"],
        "power_limit_mw": gpu["enforced_power_limit_mw"],
        "pcie_gen_current": pcie["gen_current"],
        "pcie_gen_max": pcie["gen_max"],
        "pcie_width_current": pcie["width_current"],
        "pcie_width_max": pcie["width_max"],
        "pcie_tx_kb_s": pcie["tx_kb_s"],
        "pcie_rx_kb_s": pcie["rx_kb_s"],
    }


# --- pure converters ---------------------------------------------------------------


def test_converter_turns_recorded_h100_readings_into_a_sample() -> None:
    s = gpu_sample(0, raw_readings(H100["gpus"][0]))
    assert s.name == "NVIDIA H100 80GB HBM3"
    assert s.vram_total_bytes == 81559 * 2**20
    assert s.vram_used_bytes + s.vram_free_bytes == s.vram_total_bytes  # type: ignore[operator]
    assert s.power_draw_w == pytest.approx(71.234)
    assert s.power_limit_w == 700.0
    assert (s.pcie_gen_current, s.pcie_gen_max, s.pcie_width_current) == (5, 5, 16)
    assert s.unavailable == ()


def test_converter_marks_missing_readings_as_unavailable() -> None:
    raw = raw_readings(RTX4090X2["gpus"][0])
    raw["power_mw"] = None
    raw["memory"] = None
    s = gpu_sample(1, raw)
    assert s.power_draw_w is None
    assert s.vram_total_bytes is None
    assert s.vram_free_bytes is None
    assert s.power_limit_w == 450.0
    assert s.unavailable == ("memory", "power_mw")


def test_converter_of_nothing_is_an_all_none_sample() -> None:
    s = gpu_sample(3, {})
    assert s.index == 3
    assert s.unavailable == tuple(READERS)
    assert all(v is None for k, v in s.to_dict().items() if k not in ("index", "unavailable"))


def test_decode_text_accepts_str_bytes_and_none() -> None:
    assert decode_text(b"GPU-1") == "GPU-1"
    assert decode_text("GPU-1") == "GPU-1"
    assert decode_text(None) is None


# --- fetch path on the fake ----------------------------------------------------


def test_two_gpus_are_reported_with_their_recorded_values() -> None:
    fake = FakeNvml(RTX4090X2)
    samples = NvmlSource(fake).sample()
    assert [s.index for s in samples] == [0, 1]
    busy, idle = samples
    assert busy.uuid != idle.uuid
    assert busy.gpu_util_pct == 97
    assert busy.mem_util_pct == 81
    assert busy.vram_used_bytes == 19803602944
    assert busy.pcie_rx_kb_s == 215000
    assert busy.pcie_tx_kb_s == 41000
    assert idle.pcie_gen_current == 1
    assert idle.pcie_gen_max == 4
    assert idle.temperature_c == 34
    assert all(s.unavailable == () for s in samples)


def test_driver_version_is_read_at_init() -> None:
    source = NvmlSource(FakeNvml(H100))
    source.sample()
    assert source.driver_version == "580.65.06"


def test_unsupported_field_is_none_and_the_rest_intact(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNvml(RTX4090X2)
    fake.unsupported(1, "nvmlDeviceGetPowerUsage")
    source = NvmlSource(fake)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            first, second = source.sample()
    assert second.power_draw_w is None
    assert second.unavailable == ("power_mw",)
    assert second.power_limit_w == 450.0
    assert second.vram_total_bytes == 25757220864
    assert first.power_draw_w == pytest.approx(402.117)
    lines = [r for r in caplog.records if "power_mw" in r.getMessage()]
    assert len(lines) == 1
    assert "GPU 1" in lines[0].getMessage()
    assert "NotSupported" in lines[0].getMessage()


def test_no_library_gives_no_gpus_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNvml(H100, library_missing=True)
    source = NvmlSource(fake)
    with caplog.at_level(logging.WARNING):
        assert all(source.sample() == [] for _ in range(50))
    assert fake.init_calls == 1
    assert len(caplog.records) == 1
    assert "LibraryNotFound" in caplog.records[0].getMessage()
    assert source.unavailable_reason is not None


def test_driver_not_loaded_gives_no_gpus() -> None:
    class NoDriver(FakeNvml):
        def nvmlInit(self) -> None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    assert NvmlSource(NoDriver(H100)).sample() == []


def test_a_gpu_lost_mid_run_keeps_its_index_and_the_other_gpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeNvml(RTX4090X2)
    source = NvmlSource(fake)
    assert source.sample()[0].name == "NVIDIA GeForce RTX 4090"
    fake.lose_gpu(0)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            lost, fine = source.sample()
    assert lost.index == 0
    assert lost.vram_total_bytes is None
    assert lost.name is None
    assert set(lost.unavailable) == set(READERS)
    assert fine.unavailable == ()
    assert fine.vram_total_bytes == 25757220864
    assert len(caplog.records) == len(READERS)  # once per (gpu, field), not per sample
    assert all("GpuIsLost" in r.getMessage() for r in caplog.records)


def test_close_shuts_nvml_down_and_later_samples_are_empty() -> None:
    fake = FakeNvml(H100)
    source = NvmlSource(fake)
    assert len(source.sample()) == 1
    source.close()
    assert not fake.initialized
    assert source.sample() == []


def test_real_pynvml_on_this_box_never_raises() -> None:
    """The real path: GPUs when a driver is present, [] otherwise (this CI box)."""
    source = NvmlSource()
    samples = source.sample()
    assert all(isinstance(s, GpuSample) for s in samples)
    if not samples:
        assert source.unavailable_reason is not None
    for s in samples:
        assert s.vram_total_bytes is None or s.vram_total_bytes > 0
    source.close()
