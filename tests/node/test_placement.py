"""Placement and eviction decisions (pure), on GPU figures recorded from real boxes
through the fake NVML, and the n_gpu_layers they hand to the real llama.cpp runner."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from node_agent.inventory import ModelFile, read_model_file
from node_agent.memory import RAM_HEADROOM_BYTES, VRAM_HEADROOM_BYTES, estimate_memory
from node_agent.models import ModelManager
from node_agent.placement import (
    Budget,
    Resident,
    budget_from,
    candidates,
    family,
    measure_budget,
    place,
    plan_eviction,
    reclaimable,
)
from node_agent.runtimes.llama.supervisor import LlamaRunner
from tests.node.fake_nvml import FakeNvml, load_fixture

MiB, GiB = 1 << 20, 1 << 30

LLAMA7B = ModelFile(
    path="/m/llama-7b.Q4_K_M.gguf",
    name="llama-7b.Q4_K_M",
    size_bytes=4_081_004_224,
    mtime_ns=0,
    usable=True,
    architecture="llama",
    parameter_count=6_738_415_616,
    quantization="Q4_K_M",
    tensor_bytes=4_080_000_000,
    context_length=4096,
    block_count=32,
    embedding_length=4096,
    head_count=32,
    head_count_kv=32,
    vocab_size=32000,
)


def quant(name: str, bits: float, sep: str = ".") -> ModelFile:
    tensor_bytes = int(6_738_415_616 * bits / 8)
    return replace(
        LLAMA7B,
        path=f"/m/llama-7b{sep}{name}.gguf",
        name=f"llama-7b{sep}{name}",
        quantization=name,
        tensor_bytes=tensor_bytes,
        size_bytes=tensor_bytes + 1000,
    )


Q4, Q8, F16 = quant("Q4_K_M", 4.85), quant("Q8_0", 8.5, "-"), quant("F16", 16.0)


def box(fixture: str, ram: int = 64 * GiB) -> Budget:
    return measure_budget(FakeNvml(load_fixture(fixture)), available_ram=ram)


def test_the_budget_is_free_vram_and_available_ram_less_headroom() -> None:
    h100 = box("nvml_h100_80gb_hbm3.json")
    assert h100 == Budget(64 * GiB - RAM_HEADROOM_BYTES, 80_957_407_232 - VRAM_HEADROOM_BYTES)
    two = box("nvml_rtx4090_x2.json")
    assert two.vram_bytes == 5_953_617_920 + 25_314_525_184 - 2 * VRAM_HEADROOM_BYTES
    assert budget_from(8 * GiB, [None, 100 * MiB]) == Budget(8 * GiB - RAM_HEADROOM_BYTES, 0)


def test_no_nvml_means_a_cpu_only_budget() -> None:
    assert measure_budget(FakeNvml(library_missing=True), available_ram=GiB).vram_bytes == 0


def test_a_model_goes_wholly_on_a_gpu_that_holds_it() -> None:
    p = place([Q4], 4096, box("nvml_h100_80gb_hbm3.json"))
    assert (p.fits, p.n_gpu_layers) == (True, 32)
    assert p.vram_bytes == estimate_memory(Q4, 4096, n_gpu_layers=32).gpu_bytes
    assert "all 32 layers on the GPU" in p.reason


def test_a_model_is_split_when_vram_is_short_and_on_cpu_without_a_gpu() -> None:
    split = place([Q4], 4096, Budget(64 * GiB, 3 * GiB))
    assert 0 < split.n_gpu_layers < 32
    assert split.vram_bytes <= 3 * GiB
    cpu = place([Q4], 4096, Budget(64 * GiB, 0))
    assert (cpu.n_gpu_layers, cpu.vram_bytes) == (0, 0)
    assert "on CPU" in cpu.reason


def test_the_best_quantization_that_fits_is_chosen() -> None:
    assert place([Q4, Q8, F16], 4096, box("nvml_h100_80gb_hbm3.json")).model == F16
    on_8gb = place([Q4, Q8, F16], 4096, Budget(64 * GiB, 8 * GiB))
    assert on_8gb.model == Q4  # wholly on the GPU beats Q8_0 split with the CPU
    assert on_8gb.n_gpu_layers == 32
    assert "also fit" in on_8gb.reason
    cpu_12gb = place([Q4, Q8, F16], 4096, Budget(12 * GiB, 0))
    assert cpu_12gb.model == Q8  # F16 needs more than 12 GiB


def test_nothing_that_fits_is_refused_with_each_reason() -> None:
    p = place([Q4, Q8], 4096, Budget(2 * GiB, 0))
    assert not p.fits
    assert p.reason.startswith("no quantization fits this box")
    assert "llama-7b.Q4_K_M" in p.reason
    assert "llama-7b-Q8_0" in p.reason
    assert "no usable GGUF" in place([], 512, Budget(GiB, 0)).reason


def test_a_fixed_layer_count_is_honoured_or_refused() -> None:
    p = place([Q4], 2048, Budget(64 * GiB, 80 * GiB), n_gpu_layers=10)
    assert (p.n_gpu_layers, p.fits) == (10, True)
    assert place([Q4], 2048, Budget(64 * GiB, 80 * GiB), n_gpu_layers=-1).n_gpu_layers == 32
    refused = place([Q4], 2048, Budget(64 * GiB, 0), n_gpu_layers=32)
    assert not refused.fits
    assert "32 GPU layers" in refused.reason


def test_quantizations_group_into_one_family() -> None:
    assert {family(m) for m in (Q4, Q8, F16)} == {"llama-7b"}
    assert family(replace(Q4, quantization=None)) == "llama-7b"
    assert family(replace(Q4, name="mistral", quantization=None)) == "mistral"
    broken = replace(F16, name="llama-7b.bad", usable=False)
    assert candidates("llama-7b", [Q4, Q8, broken]) == [Q4, Q8]
    assert candidates("llama-7b-Q8_0", [Q4, Q8]) == [Q8]
    assert candidates("qwen", [Q4]) == []


def resident(name: str, ram: int, last_used: float, busy: int = 0) -> Resident:
    return Resident(name, ram, 0, busy, last_used)


def test_eviction_takes_idle_models_least_recently_used_first() -> None:
    residents = [
        resident("a", 4 * GiB, 30.0),
        resident("b", 4 * GiB, 10.0),
        resident("c", 4 * GiB, 20.0),
    ]
    plan = plan_eviction(6 * GiB, 0, Budget(3 * GiB, 0), residents)
    assert plan.evict == ("b",)
    plan = plan_eviction(10 * GiB, 0, Budget(3 * GiB, 0), residents)
    assert plan.evict == ("b", "c")
    assert plan_eviction(GiB, 0, Budget(3 * GiB, 0), residents).evict == ()


def test_eviction_never_takes_a_busy_or_protected_model_and_says_why() -> None:
    residents = [
        resident("busy", 8 * GiB, 1.0, busy=2),
        resident("old", 2 * GiB, 2.0),
        resident("mine", 2 * GiB, 0.0),
    ]
    plan = plan_eviction(6 * GiB, 0, Budget(3 * GiB, 0), residents, protect={"mine"})
    assert not plan.fits
    assert plan.evict == ()
    assert "busy, never evicted: busy (2 in flight or queued)" in plan.reason
    assert "kept: mine" in plan.reason
    assert reclaimable(Budget(3 * GiB, 0), residents, {"mine"}) == Budget(5 * GiB, 0)


def test_the_runner_gets_the_layers_placement_chose(model_path: Path, tmp_path: Path) -> None:
    smol = read_model_file(model_path)
    assert smol.block_count == 30
    full = estimate_memory(smol, 512, n_gpu_layers=30)
    gpu = ModelManager(run_dir=tmp_path, budget=Budget(GiB, full.gpu_bytes))
    runner = gpu.add_llama("smol", model_path, n_ctx=512)
    assert runner.argv[runner.argv.index("--n-gpu-layers") + 1] == "30"
    half = full.compute_bytes + (full.weights_bytes + full.kv_cache_bytes) // 2
    tight = ModelManager(run_dir=tmp_path, budget=Budget(GiB, half))
    part = tight.add_llama("smol", model_path, n_ctx=512)
    layers = int(part.argv[part.argv.index("--n-gpu-layers") + 1])
    assert layers == 15
    cpu = ModelManager(run_dir=tmp_path, budget=Budget(GiB, 0))
    assert isinstance(cpu.add_llama("smol", model_path, n_ctx=512), LlamaRunner)
    assert cpu.stats()["smol"]["n_gpu_layers"] == 0
    with pytest.raises(ValueError, match=r"cannot load smol: .*does not fit"):
        ModelManager(run_dir=tmp_path, budget=Budget(50 * MiB, 0)).add_llama("smol", model_path)
