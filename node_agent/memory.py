"""How much memory a GGUF model needs, where its layers go, and which quantization to load.

All pure: plain data in, a decision with its reason out; the model manager acts.

The estimate follows what llama.cpp allocates for a model (its log lines
``model buffer``, ``KV buffer``, ``compute buffer``):

- weights: the bytes of all tensors (``ModelFile.tensor_bytes``; the file size
  when unknown);
- KV cache: ``n_layers * n_ctx * (n_embd_k + n_embd_v) * kv_type_bytes``, with
  ``n_embd_k = head_count_kv * key_length`` (key_length defaults to
  ``embedding_length / head_count``), i.e. ``2 * n_layers * n_ctx * n_embd_kv``
  when keys and values have the same width; f16 cache = 2 bytes;
- compute buffer: the larger of the logits of one micro-batch
  (``n_ubatch * n_vocab`` floats) and the attention scores without flash
  attention (``n_ubatch * n_head * n_ctx`` floats), plus the attention mask
  (``n_ubatch * n_ctx`` floats). Checked against llama.cpp 0.3.36 on SmolLM2:
  97/100/160 MiB predicted vs 98/99/166 MiB reported at n_ctx 512/2048/8192;
- overhead: :data:`OVERHEAD_BYTES`, a constant for the tokenizer, graph
  metadata and allocator slack. The runner process itself (Python plus
  libllama, ~40 MiB RSS measured) is not part of the model's estimate.

GPU split (``n_gpu_layers`` of ``n_layers``): weights and KV cache in
proportion to the layers offloaded; the compute buffer on the GPU as soon as
one layer is, on the host otherwise; the overhead on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from node_agent.inventory import ModelFile

MiB = 1 << 20
N_UBATCH = 512  # llama.cpp's default physical batch
FLOAT_BYTES = 4  # compute buffers are f32
OVERHEAD_BYTES = 16 * MiB
VRAM_HEADROOM_BYTES = 512 * MiB  # CUDA context, cuBLAS workspace, fragmentation
RAM_HEADROOM_BYTES = 256 * MiB  # leave the OS and the daemon room to breathe


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    overhead_bytes: int
    n_layers: int
    n_gpu_layers: int
    gpu_bytes: int
    host_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.gpu_bytes + self.host_bytes


@dataclass(frozen=True, slots=True)
class OffloadPlan:
    mode: str  # "all" | "some" | "none" | "refused"
    n_gpu_layers: int
    reason: str
    estimate: MemoryEstimate | None

    @property
    def fits(self) -> bool:
        return self.mode != "refused"


@dataclass(frozen=True, slots=True)
class QuantChoice:
    model: ModelFile | None
    plan: OffloadPlan | None
    reason: str
    rejected: tuple[tuple[str, str], ...] = ()


class NotEstimable(ValueError):
    """The model's metadata lacks what the estimate needs (layers, heads, width)."""


def _shape(model: ModelFile) -> tuple[int, int, int, int, int]:
    """(n_layers, n_head, n_embd_k, n_embd_v, n_vocab) from the metadata."""
    if not model.usable:
        raise NotEstimable(f"{model.name} is unusable: {model.reason}")
    n_layers, n_embd, n_head = model.block_count, model.embedding_length, model.head_count
    if not (n_layers and n_embd and n_head):
        raise NotEstimable(f"{model.name}: GGUF lacks block_count/embedding_length/head_count")
    n_head_kv = model.head_count_kv or n_head
    k_len = model.key_length or n_embd // n_head
    v_len = model.value_length or k_len
    return n_layers, n_head, n_head_kv * k_len, n_head_kv * v_len, model.vocab_size or 0


def estimate_memory(
    model: ModelFile, n_ctx: int, *, n_gpu_layers: int = 0, kv_type_bytes: int = 2
) -> MemoryEstimate:
    """Memory for ``model`` at context ``n_ctx``; raises :class:`NotEstimable`."""
    n_layers, n_head, n_embd_k, n_embd_v, n_vocab = _shape(model)
    weights = model.tensor_bytes or model.size_bytes
    kv = n_layers * n_ctx * (n_embd_k + n_embd_v) * kv_type_bytes
    compute = FLOAT_BYTES * N_UBATCH * (max(n_vocab, n_head * n_ctx) + n_ctx)
    on_gpu = max(0, min(n_gpu_layers, n_layers))
    gpu_share = (weights + kv) * on_gpu // n_layers
    gpu = gpu_share + (compute if on_gpu else 0)
    host = weights + kv - gpu_share + (0 if on_gpu else compute) + OVERHEAD_BYTES
    return MemoryEstimate(weights, kv, compute, OVERHEAD_BYTES, n_layers, on_gpu, gpu, host)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def plan_offload(
    model: ModelFile,
    n_ctx: int,
    free_vram_bytes: int,
    free_ram_bytes: int,
    *,
    kv_type_bytes: int = 2,
    vram_headroom_bytes: int = VRAM_HEADROOM_BYTES,
    ram_headroom_bytes: int = RAM_HEADROOM_BYTES,
) -> OffloadPlan:
    """The most GPU layers that fit free VRAM while the rest fits free RAM (all, some, none)."""
    try:
        full = estimate_memory(model, n_ctx, kv_type_bytes=kv_type_bytes)
    except NotEstimable as exc:
        return OffloadPlan("refused", 0, str(exc), None)
    vram = max(0, free_vram_bytes - vram_headroom_bytes) if free_vram_bytes > 0 else 0
    ram = max(0, free_ram_bytes - ram_headroom_bytes)
    for k in range(full.n_layers, -1, -1):
        e = estimate_memory(model, n_ctx, n_gpu_layers=k, kv_type_bytes=kv_type_bytes)
        if e.gpu_bytes <= vram and e.host_bytes <= ram:
            return OffloadPlan(_mode(k, e.n_layers), k, _why(e, vram, ram, free_vram_bytes), e)
    best = estimate_memory(model, n_ctx, n_gpu_layers=full.n_layers, kv_type_bytes=kv_type_bytes)
    reason = (
        f"{model.name} at n_ctx={n_ctx} does not fit: needs {_gib(full.host_bytes)} RAM on CPU "
        f"alone ({_gib(ram)} usable) or {_gib(best.gpu_bytes)} VRAM fully offloaded "
        f"({_gib(vram)} usable), and no split of its {full.n_layers} layers fits both"
    )
    return OffloadPlan("refused", 0, reason, None)


def _mode(k: int, n_layers: int) -> str:
    return "all" if k == n_layers else "some" if k else "none"


def _why(e: MemoryEstimate, vram: int, ram: int, free_vram: int) -> str:
    need = (
        f"{_gib(e.gpu_bytes)} of {_gib(vram)} usable VRAM, {_gib(e.host_bytes)} of {_gib(ram)} RAM"
    )
    if e.n_gpu_layers == e.n_layers:
        return f"all {e.n_layers} layers on the GPU ({need})"
    if e.n_gpu_layers:
        return f"{e.n_gpu_layers} of {e.n_layers} layers on the GPU, the rest on CPU ({need})"
    if free_vram <= 0:
        return f"no GPU memory: all {e.n_layers} layers on CPU ({need})"
    return f"not even one layer fits the free VRAM: all {e.n_layers} layers on CPU ({need})"


_TIER = {"all": 2, "some": 1, "none": 0}


def choose_quantization(
    candidates: Sequence[ModelFile],
    free_vram_bytes: int,
    free_ram_bytes: int,
    *,
    n_ctx: int,
    vram_headroom_bytes: int = VRAM_HEADROOM_BYTES,
    ram_headroom_bytes: int = RAM_HEADROOM_BYTES,
) -> QuantChoice:
    """Best quality that fits, preferring the fastest placement.

    Rule: a candidate wholly on the GPU beats one split between GPU and CPU,
    which beats one on CPU alone (token speed is bound by the memory bandwidth of
    wherever the weights live); within a placement, the most bits per weight wins,
    and among splits, more GPU layers first.
    """
    fitting: list[tuple[ModelFile, OffloadPlan]] = []
    rejected: list[tuple[str, str]] = []
    for m in candidates:
        plan = plan_offload(
            m,
            n_ctx,
            free_vram_bytes,
            free_ram_bytes,
            vram_headroom_bytes=vram_headroom_bytes,
            ram_headroom_bytes=ram_headroom_bytes,
        )
        if plan.fits:
            fitting.append((m, plan))
        else:
            rejected.append((m.name, plan.reason))
    if not fitting:
        detail = "; ".join(f"{n}: {r}" for n, r in rejected) or "no candidates"
        return QuantChoice(None, None, f"no quantization fits this box: {detail}", tuple(rejected))

    def rank(mp: tuple[ModelFile, OffloadPlan]) -> tuple[int, int, float]:
        m, plan = mp
        return (_TIER[plan.mode], plan.n_gpu_layers, m.bits_per_weight or 0.0)

    fitting.sort(key=rank, reverse=True)
    (best, plan), others = fitting[0], fitting[1:]
    bpw = f"{best.bits_per_weight or 0:.2f} bits/weight"
    reason = f"{best.quantization or best.name} ({bpw}): {plan.reason}"
    if others:
        reason += f"; also fit: {', '.join(m.quantization or m.name for m, _ in others)}"
    return QuantChoice(best, plan, reason, tuple(rejected))
