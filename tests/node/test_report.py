"""The node's report of its models: what the coordinator's protocol accepts, nothing else."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from meshgate.node_messages import Inventory, ModelLoad, Telemetry, parse, parse_telemetry
from node_agent.inventory import read_model_file
from node_agent.report import (
    LoadDeltas,
    LoadTimes,
    annotate_inventory,
    capacity,
    clean_runtime,
    load_state,
    resident_bytes,
    with_load_now,
)


def test_a_gguf_model_is_reported_with_its_context_memory_load_time_and_one_slot(
        model_path: Path) -> None:
    f = read_model_file(model_path)
    entry = {"name": "smollm2", "loaded": False, "kind": "llama.cpp", "path": str(model_path)}
    (out,) = annotate_inventory([entry], {"smollm2": {"kind": "llama.cpp"}}, {"smollm2": f}, 2048)
    info = parse({"models": [out]}, Inventory).entries()["smollm2"]
    assert info.n_ctx == 2048
    assert info.capacity == 1
    assert info.memory_bytes is not None
    assert f.size_bytes < info.memory_bytes < 4 * f.size_bytes  # weights + KV + buffers
    assert info.load_time_s is not None
    assert not info.load_time_measured


def test_a_measured_load_time_replaces_the_estimate() -> None:
    times = LoadTimes()
    times.observe("m", "loading", 10.0)
    times.observe("m", "loading", 10.5)
    times.observe("m", "loaded", 13.25)
    (out,) = annotate_inventory([{"name": "m", "kind": "upstream"}], {}, {}, 2048, times)
    assert (out["load_time_s"], out["load_time_measured"], out["capacity"]) == (3.25, True, 0)


def test_names_past_the_bound_and_models_past_the_count_are_not_sent() -> None:
    models = [{"name": "x" * 300}, *({"name": f"m{i}"} for i in range(600))]
    out = annotate_inventory(models, {}, {}, 2048)
    assert len(out) == 512
    assert out[0]["name"] == "m0"
    parse({"models": out}, Inventory)


def test_runtime_figures_the_protocol_refuses_are_dropped() -> None:
    runtime = {"m": {"decode_tps": math.nan, "prefill_tps": 1e300, "in_flight": -1,
                     "queued": 2, "kind": "ollama"}, "error": "boom"}
    clean = clean_runtime(runtime)
    assert set(clean) == {"m"}
    tel = parse_telemetry({"runtime": clean})
    assert isinstance(tel, Telemetry)
    load = tel.runtime["m"]
    assert (load.decode_tps, load.prefill_tps, load.in_flight, load.queued) == (
        None, None, None, 2)
    assert load.capacity == capacity("ollama") == 1


def test_load_deltas_carry_only_what_changed() -> None:
    deltas = LoadDeltas()
    stats = {"a": {"state": "loaded", "in_flight": 0, "queued": 0},
             "b": {"state": "unloaded", "in_flight": 0, "queued": 0}}
    first = deltas.delta(load_state(stats))
    assert first is not None
    assert set(first["models"]) == {"a", "b"}
    assert deltas.delta(load_state(stats)) is None
    stats["a"]["in_flight"] = 2
    body = deltas.delta(load_state(stats))
    assert body is not None
    delta = parse_telemetry(body)
    assert not isinstance(delta, Telemetry)
    assert delta.models == {"a": ModelLoad(loaded=True, in_flight=2, queued=0)}


def test_a_telemetry_sample_goes_up_with_the_load_of_now_and_deltas_go_on_from_it() -> None:
    """The sample was taken while a request ran; it is sent after that request ended: the
    coordinator must read the model idle (else it routes the next request to a cold node)."""
    sample = clean_runtime({"a": {"state": "loaded", "in_flight": 1, "queued": 2, "queue": 2,
                                  "decode_tps": 30.0},
                            "gone": {"state": "loaded", "in_flight": 1}})
    now = load_state({"a": {"state": "loaded", "in_flight": 0, "queued": 0},
                      "new": {"state": "unloaded", "in_flight": 0, "queued": 0}})
    with_load_now(sample, now)
    tel = parse_telemetry({"ts": 1.0, "runtime": sample})
    assert isinstance(tel, Telemetry)
    a = tel.runtime["a"]
    assert (a.loaded, a.in_flight, a.queued, a.waiting, a.decode_tps) == (True, 0, 0, 0, 30.0)
    assert tel.runtime["gone"].in_flight == 1  # not in the load now: left as sampled
    deltas = LoadDeltas()
    deltas.reported({n: now[n] for n in sample if n in now})
    body = deltas.delta(now)  # "a" went up as it is: only the model the sample lacked
    assert body is not None
    assert set(body["models"]) == {"new"}


GEMMA = Path.home() / ".cache" / "meshgate" / "models" / "gemma-3-270m-q4_k_m.gguf"


def runner_rss_after_one_request(path: Path, tmp: Path) -> int:
    """Start the real llama.cpp runner on `path` (n_ctx 2048, CPU), answer one request,
    return its resident set size."""
    sock = tmp / "r.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "node_agent.runtimes.llama.worker", "--model", str(path),
         "--uds", str(sock), "--name", "m", "--n-ctx", "2048", "--n-gpu-layers", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock), retries=50),
                          timeout=120) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("http://runner/health").status_code == 200:
                        break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the runner never came up"
                    time.sleep(0.2)
            reply = client.post("http://runner/v1/completions",
                                json={"model": "m", "prompt": "Hello " * 300, "max_tokens": 8})
            assert reply.status_code == 200
        return int(psutil.Process(proc.pid).memory_info().rss)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "gemma"])
def test_the_memory_estimate_sent_is_within_15_percent_of_the_runners_rss(
        which: str, model_path: Path, tmp_path: Path) -> None:
    path = model_path if which == "smollm2" else GEMMA
    if not path.exists():
        pytest.skip("Gemma 3 270M not fetched: ./scripts/fetch_model.sh gemma")
    estimate = resident_bytes(read_model_file(path), 2048)
    rss = runner_rss_after_one_request(path, tmp_path)
    assert abs(estimate - rss) / rss <= 0.15, (estimate, rss)
