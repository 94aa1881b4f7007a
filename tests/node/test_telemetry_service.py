"""TelemetryService (sampling off the event loop), NodeMetrics and the status table, in-process."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node_agent.metrics import UNKNOWN, NodeMetrics
from node_agent.nvml import NvmlSource
from node_agent.slots import RATE_WINDOW, Rates
from node_agent.status import render_status
from node_agent.telemetry import TelemetrySampler, TelemetryService
from tests.node.fake_nvml import FakeNvml, load_fixture


class ThreadRecordingSource:
    """A GPU source that records which thread sampled it."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def sample(self) -> list[Any]:
        self.threads.append(threading.get_ident())
        return []


async def test_sampling_runs_in_a_worker_thread_and_stats_on_the_loop(tmp_path: Path) -> None:
    source = ThreadRecordingSource()
    loop_threads: list[int] = []

    def stats() -> dict[str, Any]:
        loop_threads.append(threading.get_ident())
        return {"m": {"in_flight": 1}}

    extra_threads: list[int] = []

    def extra(runtime: dict[str, Any]) -> None:
        extra_threads.append(threading.get_ident())
        runtime["m"]["rss_bytes"] = 123

    service = TelemetryService(
        TelemetrySampler([tmp_path], source), period=1.0, runtime_stats=stats, runtime_extra=extra
    )
    assert service.latest() is None
    sample = await service.refresh()
    here = threading.get_ident()
    assert loop_threads == [here]
    assert source.threads
    assert source.threads[0] != here
    assert extra_threads == source.threads
    assert sample["runtime"] == {"m": {"in_flight": 1, "rss_bytes": 123}}
    assert service.latest() is sample
    assert sample["host"]["disk_free_bytes"][str(tmp_path)] > 0


async def test_a_failing_stats_callback_is_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, Any]:
        raise KeyError("boom")

    def broken_extra(runtime: dict[str, Any]) -> None:
        raise RuntimeError("no /proc")

    service = TelemetryService(
        TelemetrySampler([], None), runtime_stats=broken, runtime_extra=broken_extra
    )
    sample = await service.refresh()
    assert sample["runtime"] == {"error": "KeyError: 'boom'"}
    assert sample["gpus"] == []
    assert "runtime stats failed" in caplog.text
    assert "runtime figures failed" in caplog.text


async def test_no_nvml_library_is_a_cpu_only_sample(tmp_path: Path) -> None:
    nvml = NvmlSource(FakeNvml(library_missing=True))
    service = TelemetryService(TelemetrySampler([tmp_path], nvml))
    assert (await service.refresh())["gpus"] == []
    sample = await service.refresh()
    assert sample["gpus"] == []
    assert nvml.unavailable_reason is not None
    assert sample["nvml"]["unavailable_reason"] == nvml.unavailable_reason


def parsed(metrics: NodeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def test_metrics_label_only_served_models_and_count_tokens() -> None:
    metrics = NodeMetrics(served=lambda: ["a"])
    track = metrics.track("a")
    track.first_token()
    track.usage = {"prompt_tokens": 5, "completion_tokens": 9}  # the pipeline's, read once
    track.finish(200)
    track.finish(500)  # a second finish is ignored
    metrics.track("random-name-1").finish(404)
    samples = parsed(metrics)
    assert (
        samples[
            ("meshgate_node_requests_total", (("model", "a"), ("status", "200"), ("via", "proxy")))
        ]
        == 1
    )
    assert (
        "meshgate_node_requests_total",
        (("model", "a"), ("status", "500"), ("via", "proxy")),
    ) not in samples
    assert (
        samples[
            (
                "meshgate_node_requests_total",
                (("model", UNKNOWN), ("status", "404"), ("via", "proxy")),
            )
        ]
        == 1
    )
    assert samples[("meshgate_node_tokens_total", (("kind", "prompt"), ("model", "a")))] == 5
    assert samples[("meshgate_node_tokens_total", (("kind", "completion"), ("model", "a")))] == 9


def test_one_rate_tracker_times_prefill_on_streams_and_keeps_a_window() -> None:
    rates = Rates()
    assert rates.figures() == {"prompt_tokens_per_s": None, "generation_tokens_per_s": None}
    rates.add({"prompt_tokens": 100, "completion_tokens": 10}, 0.5, 2.0)  # streamed
    # a whole answer: its 50 prompt tokens took ~0.25 s at 200/s, so 0.75 s of decoding
    rates.add({"prompt_tokens": 50, "completion_tokens": 30}, None, 1.0)
    assert rates.figures() == {"prompt_tokens_per_s": 200.0, "generation_tokens_per_s": 14.5}
    # a whole answer faster than its prompt alone at that rate (a cached prompt): no sample
    rates.add({"prompt_tokens": 1000, "completion_tokens": 30}, None, 1.0)
    assert rates.figures() == {"prompt_tokens_per_s": 200.0, "generation_tokens_per_s": 14.5}
    fresh = Rates()  # no prompt rate yet: the whole time is decoding (a low figure)
    fresh.add({"prompt_tokens": 50, "completion_tokens": 30}, None, 1.0)
    assert fresh.figures() == {"prompt_tokens_per_s": None, "generation_tokens_per_s": 30.0}
    for _ in range(RATE_WINDOW):
        rates.add({"prompt_tokens": 10, "completion_tokens": 10}, 1.0, 1.0)
    assert rates.figures() == {"prompt_tokens_per_s": 10.0, "generation_tokens_per_s": 10.0}


def test_metrics_read_runtime_stats_and_the_latest_sample() -> None:
    nvml = NvmlSource(FakeNvml(load_fixture("nvml_h100_80gb_hbm3.json")))
    gpus = [g.to_dict() for g in nvml.sample()]
    sample = {"host": {"cpu_util_pct": 42.5, "mem_available_bytes": 1000}, "gpus": gpus}
    stats = {"a": {"in_flight": 2, "queued": 3, "crashes": 1}}
    metrics = NodeMetrics(served=lambda: ["a"], stats=lambda: stats, telemetry=lambda: sample)
    samples = parsed(metrics)
    assert samples[("meshgate_node_in_flight", (("model", "a"),))] == 2
    assert samples[("meshgate_node_queue_length", (("model", "a"),))] == 3
    assert samples[("meshgate_node_runner_restarts_total", (("model", "a"),))] == 1
    assert samples[("meshgate_node_cpu_utilisation_percent", ())] == 42.5
    gpu = (("gpu", "0"), ("uuid", gpus[0]["uuid"]))
    assert samples[("meshgate_node_gpu_vram_total_bytes", gpu)] == gpus[0]["vram_total_bytes"]
    # two registries never collide: each NodeMetrics has its own
    NodeMetrics().render()


def test_status_table_names_gpus_models_and_missing_figures() -> None:
    nvml = NvmlSource(FakeNvml(load_fixture("nvml_h100_80gb_hbm3.json")))
    sample = {
        "host": {
            "cpu_count": 8,
            "cpu_util_pct": 12.5,
            "cpu_util_pct_per_core": [10.0] * 8,
            "load_avg": [0.5, 0.4, 0.3],
            "mem_total_bytes": 64 << 30,
            "mem_available_bytes": 32 << 30,
            "swap_total_bytes": 0,
            "swap_used_bytes": 0,
            "disk_free_bytes": {"/models": 100 << 30, "/gone": None},
        },
        "gpus": [g.to_dict() for g in nvml.sample()],
        "runtime": {
            "smol": {
                "kind": "llama.cpp",
                "state": "loaded",
                "rss_bytes": 3 << 30,
                "in_flight": 1,
                "queued": 2,
                "prefill_tps": 900.0,
                "decode_tps": None,
                "served": 7,
                "crashes": 1,
            }
        },
    }
    text = render_status(sample)
    assert "8 cores, 12.5% busy" in text
    assert "32.0 GiB free of 64.0 GiB" in text
    assert "/gone: missing" in text
    assert "H100" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("smol"))
    assert row.split() == [
        "smol",
        "llama.cpp",
        "yes",
        "3.0",
        "GiB",
        "1",
        "2",
        "900.0",
        "-",
        "7",
        "1",
    ]
    assert "GPUS    none" in render_status({"host": {}, "gpus": [], "runtime": {}})
    no_driver = {
        "host": {},
        "gpus": [],
        "runtime": {},
        "nvml": {"unavailable_reason": "NVMLError_LibraryNotFound: not found"},
    }
    assert "GPUS    none (NVMLError_LibraryNotFound" in render_status(no_driver)
