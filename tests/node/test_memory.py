"""Memory estimate, offload plan and quantization choice: one test per rule, plus real RSS."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from node_agent.inventory import ModelFile, read_model_file
from node_agent.memory import (
    OVERHEAD_BYTES,
    RAM_HEADROOM_BYTES,
    VRAM_HEADROOM_BYTES,
    NotEstimable,
    choose_quantization,
    estimate_memory,
    plan_offload,
)

MiB, GiB = 1 << 20, 1 << 30

# A 7B llama-like model (Llama-2-7B shapes: 32 layers, 4096 wide, 32 heads, no GQA).
LLAMA7B = ModelFile(
    path="/m/llama-7b.Q4_K_M.gguf", name="llama-7b.Q4_K_M", size_bytes=4_081_004_224,
    mtime_ns=0, usable=True, architecture="llama", parameter_count=6_738_415_616,
    quantization="Q4_K_M", tensor_bytes=4_080_000_000, context_length=4096, block_count=32,
    embedding_length=4096, head_count=32, head_count_kv=32, vocab_size=32000,
)


def quant(base: ModelFile, name: str, bits: float) -> ModelFile:
    tensor_bytes = int(base.parameter_count * bits / 8)  # type: ignore[operator]
    return replace(base, name=f"llama-7b.{name}", quantization=name, tensor_bytes=tensor_bytes,
                   size_bytes=tensor_bytes + 1000)


# --- estimate_memory ------------------------------------------------------------------


def test_kv_cache_is_two_times_layers_context_and_kv_width() -> None:
    e = estimate_memory(LLAMA7B, 4096)
    assert e.kv_cache_bytes == 2 * 32 * 4096 * 4096 * 2  # 2 GiB in f16, as llama.cpp reports


def test_grouped_query_attention_shrinks_the_kv_cache() -> None:
    gqa = replace(LLAMA7B, head_count_kv=8)
    full = estimate_memory(LLAMA7B, 4096).kv_cache_bytes
    assert estimate_memory(gqa, 4096).kv_cache_bytes * 4 == full


def test_explicit_key_and_value_lengths_are_used() -> None:
    m = replace(LLAMA7B, head_count_kv=2, key_length=192, value_length=128)
    assert estimate_memory(m, 1000).kv_cache_bytes == 32 * 1000 * (2 * 192 + 2 * 128) * 2


def test_kv_type_bytes_scales_the_cache() -> None:
    f16 = estimate_memory(LLAMA7B, 2048).kv_cache_bytes
    assert estimate_memory(LLAMA7B, 2048, kv_type_bytes=1).kv_cache_bytes * 2 == f16


def test_weights_are_the_tensor_bytes_or_else_the_file_size() -> None:
    assert estimate_memory(LLAMA7B, 512).weights_bytes == LLAMA7B.tensor_bytes
    no_tensors = replace(LLAMA7B, tensor_bytes=None)
    assert estimate_memory(no_tensors, 512).weights_bytes == LLAMA7B.size_bytes


def test_compute_buffer_is_the_larger_of_logits_and_attention_scores() -> None:
    small_ctx = estimate_memory(LLAMA7B, 512).compute_bytes  # 32000 > 32 * 512: logits
    assert small_ctx == 4 * 512 * (32000 + 512)
    big_ctx = estimate_memory(LLAMA7B, 4096).compute_bytes  # 32 * 4096 > 32000: scores
    assert big_ctx == 4 * 512 * (32 * 4096 + 4096)


def test_cpu_only_puts_everything_on_the_host() -> None:
    e = estimate_memory(LLAMA7B, 2048)
    assert e.gpu_bytes == 0
    assert e.host_bytes == e.weights_bytes + e.kv_cache_bytes + e.compute_bytes + OVERHEAD_BYTES
    assert e.total_bytes == e.host_bytes


def test_full_offload_leaves_only_the_overhead_on_the_host() -> None:
    e = estimate_memory(LLAMA7B, 2048, n_gpu_layers=999)
    assert e.n_gpu_layers == 32
    assert e.host_bytes == OVERHEAD_BYTES
    assert e.gpu_bytes == e.weights_bytes + e.kv_cache_bytes + e.compute_bytes


def test_partial_offload_splits_weights_and_cache_by_layers() -> None:
    half = estimate_memory(LLAMA7B, 2048, n_gpu_layers=16)
    share = (half.weights_bytes + half.kv_cache_bytes) // 2
    assert half.gpu_bytes == share + half.compute_bytes
    assert half.host_bytes == half.weights_bytes + half.kv_cache_bytes - share + OVERHEAD_BYTES


def test_unusable_or_shapeless_models_are_not_estimable() -> None:
    with pytest.raises(NotEstimable, match="unusable"):
        estimate_memory(replace(LLAMA7B, usable=False, reason="truncated"), 512)
    with pytest.raises(NotEstimable, match="block_count"):
        estimate_memory(replace(LLAMA7B, head_count=None), 512)


# --- plan_offload -------------------------------------------------------------------------


def test_all_layers_on_a_big_gpu() -> None:
    plan = plan_offload(LLAMA7B, 4096, free_vram_bytes=80 * GiB, free_ram_bytes=64 * GiB)
    assert plan.mode == "all"
    assert plan.n_gpu_layers == 32
    assert "all 32 layers on the GPU" in plan.reason


def test_some_layers_when_vram_is_short() -> None:
    plan = plan_offload(LLAMA7B, 4096, free_vram_bytes=4 * GiB, free_ram_bytes=64 * GiB)
    assert plan.mode == "some"
    assert 0 < plan.n_gpu_layers < 32
    assert plan.estimate is not None
    assert plan.estimate.gpu_bytes <= 4 * GiB - VRAM_HEADROOM_BYTES
    more = estimate_memory(LLAMA7B, 4096, n_gpu_layers=plan.n_gpu_layers + 1)
    assert more.gpu_bytes > 4 * GiB - VRAM_HEADROOM_BYTES  # the most that fits


def test_no_gpu_means_cpu_only() -> None:
    plan = plan_offload(LLAMA7B, 2048, free_vram_bytes=0, free_ram_bytes=32 * GiB)
    assert plan.mode == "none"
    assert plan.n_gpu_layers == 0
    assert plan.reason.startswith("no GPU memory")


def test_a_tiny_gpu_holds_no_layer() -> None:
    plan = plan_offload(LLAMA7B, 2048, free_vram_bytes=VRAM_HEADROOM_BYTES + MiB,
                        free_ram_bytes=32 * GiB)
    assert plan.mode == "none"
    assert "not even one layer" in plan.reason


def test_refused_with_a_reason_when_nothing_fits() -> None:
    plan = plan_offload(LLAMA7B, 4096, free_vram_bytes=2 * GiB, free_ram_bytes=2 * GiB)
    assert not plan.fits
    assert plan.estimate is None
    assert "does not fit" in plan.reason
    assert "llama-7b.Q4_K_M" in plan.reason


def test_a_gpu_can_rescue_a_box_short_of_ram() -> None:
    plan = plan_offload(LLAMA7B, 2048, free_vram_bytes=24 * GiB,
                        free_ram_bytes=RAM_HEADROOM_BYTES + 64 * MiB)
    assert plan.mode == "all"


def test_unusable_model_is_refused_with_its_own_reason() -> None:
    plan = plan_offload(replace(LLAMA7B, usable=False, reason="truncated"), 512, 0, 64 * GiB)
    assert plan.mode == "refused"
    assert "truncated" in plan.reason


# --- choose_quantization -------------------------------------------------------------------

Q4, Q5, Q8, F16 = (quant(LLAMA7B, n, b) for n, b in
                   [("Q4_K_M", 4.85), ("Q5_K_M", 5.69), ("Q8_0", 8.5), ("F16", 16.0)])


def test_best_quality_that_fits_entirely_in_vram() -> None:
    c = choose_quantization([Q4, Q8, Q5, F16], 12 * GiB, 64 * GiB, n_ctx=4096)
    assert c.model is Q8  # F16 (13.5 GB) would need a split
    assert c.plan is not None
    assert c.plan.mode == "all"
    assert c.reason.startswith("Q8_0")


def test_full_gpu_beats_a_higher_quality_split() -> None:
    c = choose_quantization([Q8, Q4], 7 * GiB, 64 * GiB, n_ctx=4096)
    assert c.model is Q4
    assert "Q8_0" in c.reason  # named among those that also fit


def test_on_cpu_the_best_quality_that_fits_ram() -> None:
    c = choose_quantization([Q4, Q8, F16], 0, 12 * GiB, n_ctx=2048)
    assert c.model is Q8
    assert ("llama-7b.F16", c.rejected[0][1]) in c.rejected


def test_refuses_with_every_reason_when_nothing_fits() -> None:
    c = choose_quantization([Q4, Q8], 0, 3 * GiB, n_ctx=4096)
    assert c.model is None
    assert c.plan is None
    assert c.reason.startswith("no quantization fits this box")
    assert [n for n, _ in c.rejected] == ["llama-7b.Q4_K_M", "llama-7b.Q8_0"]


def test_no_candidates_is_a_refusal() -> None:
    assert choose_quantization([], 0, 64 * GiB, n_ctx=512).reason.endswith("no candidates")


# --- against a real llama.cpp runner ------------------------------------------------------

TOLERANCE = 0.35
RSS_PROBE = r"""
import json, sys, psutil
import llama_cpp
proc = psutil.Process()
before = proc.memory_info().rss
llm = llama_cpp.Llama(sys.argv[1], n_ctx=int(sys.argv[2]), verbose=False)
loaded = proc.memory_info().rss
# Fill most of the context in full micro-batches: touches the weights, KV cache and compute buffer.
prompt = " ".join(f"word{i}" for i in range(int(sys.argv[2]) // 4))
llm.create_completion(prompt, max_tokens=2)
used = proc.memory_info().rss
print(json.dumps({"load": loaded - before, "used": used - before}))
"""


@pytest.mark.slow
def test_estimate_matches_a_real_llama_cpp_runner_rss(model_path: Path) -> None:
    """SmolLM2 on CPU at n_ctx=2048: estimate vs the runner's RSS growth (load + full prompt)."""
    n_ctx = 2048
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(model_path), str(n_ctx)],
                         capture_output=True, text=True, check=True, timeout=240)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    est = estimate_memory(read_model_file(model_path), n_ctx)
    error = est.total_bytes / rss["used"] - 1
    print(f"estimate {est.total_bytes / MiB:.1f} MiB, RSS growth after load "
          f"{rss['load'] / MiB:.1f} MiB, after a {n_ctx // 4}-word prompt {rss['used'] / MiB:.1f} "
          f"MiB: error {error:+.1%}")
    assert abs(error) <= TOLERANCE
