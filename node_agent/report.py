"""What this node tells the coordinator about its models, in the typed shapes of
`meshgate.node_messages` (the coordinator refuses anything else).

- `annotate_inventory`: per model the context it runs with (`n_ctx`), the
  memory estimate (weights + KV cache + compute buffers at that context, from
  the placement when loaded, else from the GGUF metadata), the load time (an
  estimate from the file size until this node measured one: `LoadTimes`) and
  the capacity in parallel requests (our llama.cpp runner: 1; an OpenAI
  upstream: 0, not capped by us, its own 429/503 pushes back; Ollama:
  `OLLAMA_NUM_PARALLEL`, else 1). Names past the protocol's bounds are left
  out with a warning, never sent.
- `clean_runtime`: the runtime figures of a telemetry frame, numbers that are
  not finite or negative dropped, entries that are not a model's left out.
- `load_state` / `LoadDeltas`: in flight, queued and loaded per model, and the
  `LoadDelta` of what changed since the last one sent.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from meshgate.node_messages import (
    MAX_MODELS,
    MAX_NAME,
    MAX_TPS,
    LoadDelta,
    ModelLoad,
    to_wire,
)
from node_agent.inventory import ModelFile
from node_agent.memory import FLOAT_BYTES, N_UBATCH, NotEstimable, estimate_memory

log = logging.getLogger(__name__)

DISK_BYTES_PER_S = 500e6  # a load-time estimate before one was measured: read the file...
RUNNER_START_S = 1.5  # ... after starting the runner process
RUNNER_BYTES = 48 << 20  # the runner process: Python, llama_cpp, libllama (measured ~48 MiB)
VOCAB_BYTES_PER_TOKEN = 256  # token texts, scores and maps in llama.cpp's vocabulary
_NUMBERS = ("in_flight", "queued", "queue", "prefill_tps", "decode_tps", "load_time_s",
            "capacity", "n_ctx", "memory_bytes", "rss_bytes")


def capacity(kind: str | None) -> int | None:
    """Parallel requests a model of `kind` takes here (0: not capped by us; None: unknown)."""
    if kind in ("llama.cpp", "llama"):
        return 1
    if kind in ("upstream", "openai"):
        return 0
    if kind == "ollama":
        raw = os.environ.get("OLLAMA_NUM_PARALLEL", "")
        return int(raw) if raw.isdigit() else 1
    return None


def resident_bytes(file: ModelFile, n_ctx: int) -> int:
    """What the runner process will hold resident for `file` at `n_ctx` on the CPU:
    weights + KV cache (`estimate_memory`), the compute pages a request really touches
    (attention scores and mask for one micro-batch; of the logits buffer llama.cpp
    reserves for a whole micro-batch only one row is written), the vocabulary's
    structures, and the runner process itself. Raises NotEstimable.

    Measured at n_ctx 2048 on CPU (runner RSS after one request): SmolLM2-135M Q4_1
    249 MB estimated / 264 MB RSS (-6%), Gemma 3 270M Q4_K_M 423 / 441 MB (-4%)
    (`estimate_memory`'s allocation-based total: 265 and 842 MB)."""
    e = estimate_memory(file, n_ctx)
    heads = file.head_count or 1
    attention = FLOAT_BYTES * N_UBATCH * (heads * n_ctx + n_ctx)
    vocab = VOCAB_BYTES_PER_TOKEN * (file.vocab_size or 0)
    return e.weights_bytes + e.kv_cache_bytes + attention + vocab + RUNNER_BYTES


def memory_bytes(stats: Mapping[str, Any], file: ModelFile | None, n_ctx: int) -> int | None:
    """The memory estimate sent: resident bytes when the file is known (CPU), else what
    the placement reserved."""
    if file is not None:
        try:
            return resident_bytes(file, n_ctx)
        except NotEstimable:
            pass
    placed = (stats.get("memory_estimate_bytes") or 0) + (stats.get("vram_estimate_bytes") or 0)
    return int(placed) if placed > 0 else None


class LoadTimes:
    """Measured seconds from load start to ready, per model (the latest)."""

    def __init__(self) -> None:
        self.measured: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def observe(self, name: str, state: str | None, now: float) -> None:
        """Feed each model's state as seen; a loading -> loaded step is a measurement."""
        if state in ("loading", "swapping"):
            self._started.setdefault(name, now)
        elif state == "loaded" and name in self._started:
            self.measured[name] = round(now - self._started.pop(name), 3)
        elif state is not None:
            self._started.pop(name, None)


def annotate_inventory(models: list[dict[str, Any]], stats: Mapping[str, Any],
                       files: Mapping[str, ModelFile], n_ctx: int,
                       load_times: LoadTimes | None = None) -> list[dict[str, Any]]:
    """The inventory's model entries with what scheduling needs, bounded for the wire."""
    out: list[dict[str, Any]] = []
    for entry in models:
        name = entry.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            log.warning("not reporting a model with a name of %d characters (at most %d)",
                        len(str(name)), MAX_NAME)
            continue
        if len(out) == MAX_MODELS:
            log.warning("reporting only the first %d of %d models", MAX_MODELS, len(models))
            break
        got = stats.get(name)
        s: Mapping[str, Any] = got if isinstance(got, dict) else {}
        file = files.get(name)
        report = dict(entry)
        if file is not None:  # a GGUF we run: at the context we give it, or its own if less
            ctx = int(s.get("n_ctx") or n_ctx)
            report["n_ctx"] = min(ctx, file.context_length or ctx)
            report["memory_bytes"] = memory_bytes(s, file, report["n_ctx"])
        report["capacity"] = capacity(s.get("kind") or entry.get("kind"))
        measured = (load_times.measured.get(name) if load_times else None)
        if measured is not None:
            report["load_time_s"], report["load_time_measured"] = measured, True
        elif file is not None:
            report["load_time_s"] = round(RUNNER_START_S + file.size_bytes / DISK_BYTES_PER_S, 2)
        out.append({k: v for k, v in report.items() if v is not None})
    return out


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0 or value > MAX_TPS * 1e8:
        return None
    return value


def clean_runtime(runtime: Mapping[str, Any]) -> dict[str, Any]:
    """Telemetry's per-model figures, only what the protocol accepts."""
    out: dict[str, Any] = {}
    for name, entry in runtime.items():
        if not isinstance(entry, dict) or not 0 < len(name) <= MAX_NAME:
            continue
        clean = dict(entry)
        for key in _NUMBERS:
            if key in clean and clean[key] is not None:
                clean[key] = _number(clean[key])
        for key in ("prefill_tps", "decode_tps"):
            if isinstance(clean.get(key), int | float) and clean[key] > MAX_TPS:
                clean[key] = None
        clean.setdefault("capacity", capacity(entry.get("kind")))
        out[name] = clean
        if len(out) == MAX_MODELS:
            break
    return out


def load_state(stats: Mapping[str, Any]) -> dict[str, ModelLoad]:
    """in flight, queued and loaded per model, from the manager's stats."""
    out: dict[str, ModelLoad] = {}
    for name, s in stats.items():
        if isinstance(s, dict) and 0 < len(name) <= MAX_NAME:
            out[name] = ModelLoad(loaded=s.get("state") == "loaded",
                                  in_flight=int(s.get("in_flight") or 0),
                                  queued=int(s.get("queued") or 0))
    return out


def with_load_now(runtime: dict[str, Any], state: Mapping[str, ModelLoad]) -> None:
    """Put the load of `state` (now) into a telemetry sample's per-model figures (`runtime`,
    as `clean_runtime` made it), in place: the sample was taken up to a period ago in the
    telemetry thread, and its in-flight count, sent after the request it counted has
    ended, would tell the coordinator the model is still busy (it then routes the client's
    next request elsewhere, to a cold load) until the next report."""
    for name, entry in runtime.items():
        now = state.get(name)
        if now is not None:
            entry["loaded"], entry["in_flight"] = now.loaded, now.in_flight
            entry["queued"] = entry["queue"] = now.queued


class LoadDeltas:
    """What changed in the load since the last delta (or full report) sent."""

    def __init__(self) -> None:
        self._sent: dict[str, ModelLoad] = {}

    def reported(self, state: Mapping[str, ModelLoad]) -> None:
        """A full telemetry went with `state`: deltas start from it."""
        self._sent = dict(state)

    def delta(self, state: Mapping[str, ModelLoad]) -> dict[str, Any] | None:
        changed = {n: load for n, load in state.items() if self._sent.get(n) != load}
        if not changed:
            return None
        self._sent.update(changed)
        return to_wire(LoadDelta(delta=True, models=changed))
