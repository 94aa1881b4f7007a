"""Host telemetry: the converter on recorded psutil values, the sampler on this real box."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest

from node_agent.nvml import NvmlSource
from node_agent.telemetry import TelemetrySampler, host_sample
from tests.node.fake_nvml import FakeNvml, load_fixture

RECORDED = load_fixture("psutil_this_box.json")


def recorded_host(**over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "cpu_count": RECORDED["cpu_count"],
        "per_core_pct": RECORDED["percpu"],
        "load_avg": RECORDED["loadavg"],
        "virtual_memory": SimpleNamespace(**RECORDED["virtual_memory"]),
        "swap_memory": SimpleNamespace(**RECORDED["swap_memory"]),
        "disk_usage": {
            d: None if u is None else SimpleNamespace(**u)
            for d, u in RECORDED["disk_usage"].items()
        },
    }
    kw.update(over)
    return kw


def test_converter_reads_a_recorded_box() -> None:
    h = host_sample(**recorded_host())
    assert h.cpu_count == 2
    assert h.mem_total_bytes == RECORDED["virtual_memory"]["total"]
    assert h.mem_available_bytes == RECORDED["virtual_memory"]["available"]
    assert (h.swap_total_bytes, h.swap_used_bytes) == (0, 0)
    assert h.disk_free_bytes["/models"] == RECORDED["disk_usage"]["/models"]["free"]
    assert h.disk_free_bytes["/missing"] is None
    assert len(h.load_avg) == 3


def test_total_utilisation_is_the_mean_of_the_cores() -> None:
    h = host_sample(**recorded_host(cpu_count=4, per_core_pct=[100.0, 50.0, 0.0, 10.0]))
    assert h.cpu_util_pct == 40.0
    assert h.cpu_util_pct_per_core == (100.0, 50.0, 0.0, 10.0)


def test_unknown_cpu_count_falls_back_to_the_cores_seen() -> None:
    h = host_sample(**recorded_host(cpu_count=None, per_core_pct=[1.0, 2.0, 3.0]))
    assert h.cpu_count == 3


def test_no_core_readings_is_zero_utilisation() -> None:
    assert host_sample(**recorded_host(per_core_pct=[])).cpu_util_pct == 0.0


def test_sample_on_this_cpu_only_box(tmp_path: Path) -> None:
    sampler = TelemetrySampler([tmp_path, tmp_path / "missing"], NvmlSource())
    s = sampler.sample()
    assert set(s) == {"host", "gpus", "nvml", "runtime", "ts"}
    assert s["gpus"] == []  # no GPU here; on a GPU box this is the real NVML path
    assert s["runtime"] == {}
    host = s["host"]
    assert host["cpu_count"] >= 1
    assert len(host["cpu_util_pct_per_core"]) >= 1
    assert 0 < host["mem_available_bytes"] <= host["mem_total_bytes"]
    assert host["disk_free_bytes"][str(tmp_path)] > 0
    assert host["disk_free_bytes"][str(tmp_path / "missing")] is None
    assert abs(s["ts"] - time.time()) < 5


def test_sample_is_json_and_msgpack_ready(tmp_path: Path) -> None:
    fake = FakeNvml(load_fixture("nvml_rtx4090_x2.json"))
    sampler = TelemetrySampler([tmp_path], NvmlSource(fake), lambda: {"loaded": ["smol"]})
    s = sampler.sample()
    assert json.loads(json.dumps(s)) == s
    assert msgpack.unpackb(msgpack.packb(s)) == s
    assert [g["index"] for g in s["gpus"]] == [0, 1]
    assert s["runtime"] == {"loaded": ["smol"]}


def test_failing_runtime_stats_is_reported_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("manager gone")

    sampler = TelemetrySampler([tmp_path], None, broken)
    with caplog.at_level(logging.WARNING):
        samples = [sampler.sample() for _ in range(3)]
    assert all(s["runtime"] == {"error": "RuntimeError: manager gone"} for s in samples)
    assert len(caplog.records) == 1


def test_a_sample_is_cheap_enough_for_a_two_second_period(tmp_path: Path) -> None:
    sampler = TelemetrySampler([tmp_path], NvmlSource())
    sampler.sample()
    t0 = time.process_time()
    for _ in range(20):
        sampler.sample()
    per_sample = (time.process_time() - t0) / 20
    assert per_sample < 0.02, f"{per_sample * 1000:.1f} ms CPU per sample"
