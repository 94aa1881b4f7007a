"""Streamed tokens per second of the real SmolLM2 through the coordinator and the tunnel,
against straight from its llama.cpp runner: paired, pinned, with the method's own noise.

    .venv/bin/python scripts/bench/stream_rate.py [--rounds 40] [--max-tokens 48]
        [--no-pin] [--node] [--json OUT.json]

Starts a real coordinator and a real enrolled node serving SmolLM2 (llama.cpp runner)
in a temporary directory on loopback, then streams the same completion (temperature 0)
many times, each round three short runs back to back in a turning order:

* ``direct``: the runner's own OpenAI API, on its unix socket;
* ``direct2``: the same again, so the round's ``direct2 / direct`` is what the method
  reads when nothing differs (its noise floor: a 2% effect is seen only if this is
  tighter than 2%);
* ``coordinator``: through the coordinator, the tunnel and the node (``--node`` adds the
  node's own port).

The rate counts from the first token to the last (the time to the first token is the
overhead bench's job), so a path's fixed latency cancels out; the first round is a
warm-up. Each path's figure is the median of its per-round ratios to that round's
``direct`` (the runs of a round ran back to back, so a slow spell of the shared box
mostly cancels out of them), with the quartiles and how many rounds fell below 1.

With pinning (the default when the box has two or more CPUs) the runner's threads run
on the first CPU and the coordinator, the node and this client on the last, so the mesh
daemons take no CPU from the model: the ratio then shows what the path costs the token
stream itself (delay that grows with the answer), not a share of a contended core.
``--no-pin`` measures the contended case. Other work on the box still moves figures:
report ``uptime`` beside them. Loopback only; every stream is bounded (120 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402

from node_agent.runtimes.llama.supervisor import socket_path  # noqa: E402
from tests.e2e.mesh import Mesh, mesh_at  # noqa: E402

MODEL = "smollm2"
MODEL_FILE = Path.home() / ".cache" / "meshgate" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Count: 1, 2, 3,"


def rate(client: openai.OpenAI, max_tokens: int) -> float | None:
    first: float | None = None
    last = 0.0
    tokens = 0
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens,
                                           temperature=0, stream=True, timeout=120):
        if chunk.choices and chunk.choices[0].text:
            tokens += 1
            last = time.perf_counter()
            if first is None:
                first = last
    if first is None or tokens < 2 or last <= first:
        return None
    return (tokens - 1) / (last - first)


def pin(pid: int, cpus: set[int]) -> int:
    """Pin every thread of `pid` to `cpus`; how many threads were pinned."""
    pinned = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
            pinned += 1
        except (ProcessLookupError, PermissionError):
            continue
    return pinned


def runner_pid(node_pid: int) -> int:
    """The llama.cpp runner: the node's child process that runs the worker."""
    for child in psutil.Process(node_pid).children(recursive=True):
        if any("llama" in part for part in child.cmdline()):
            return child.pid
    raise SystemExit("no llama.cpp runner under the node")


def pin_all(mesh: Mesh) -> dict[str, Any]:
    """Runner on the first CPU; coordinator, node and this client on the last."""
    cpus = sorted(os.sched_getaffinity(0))
    model_cpu, mesh_cpu = {cpus[0]}, {cpus[-1]}
    assert mesh.coordinator is not None
    node_pid = mesh.nodes["node"].popen.pid
    runner = runner_pid(node_pid)
    return {
        "runner_cpu": cpus[0], "mesh_cpu": cpus[-1],
        "runner_threads": pin(runner, model_cpu),
        "coordinator_threads": pin(mesh.coordinator.popen.pid, mesh_cpu),
        "node_threads": pin(node_pid, mesh_cpu),
        "client_threads": pin(os.getpid(), mesh_cpu),
    }


def summary(values: list[float]) -> dict[str, float]:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": quartiles[0], "q3": quartiles[2],
            "below_1": sum(1 for v in values if v < 1.0), "n": len(values)}


def measure(args: argparse.Namespace, mesh: Mesh) -> dict[str, Any]:
    base = mesh.proxy("node").removesuffix("/v1")
    runner = httpx.get(base + "/meshgate/telemetry").json()["runtime"][MODEL]["runner"]
    sock = socket_path(mesh.root / "node" / "run", runner)
    direct = openai.OpenAI(base_url="http://runner/v1", api_key="-", max_retries=0,
                           http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))))
    clients = {"direct": direct, "direct2": direct,
               "coordinator": openai.OpenAI(base_url=mesh.api, api_key=mesh.key, max_retries=0)}
    if args.node:
        clients["node"] = openai.OpenAI(base_url=mesh.proxy("node"), api_key="-", max_retries=0)
    pinned = pin_all(mesh) if args.pin else None
    names = list(clients)
    rates: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names if name != "direct"}
    for round_ in range(args.rounds + 1):
        turn = round_ % len(names)
        measured = {name: rate(clients[name], args.max_tokens)
                    for name in names[turn:] + names[:turn]}
        if not round_:
            continue  # warm-up
        for name, value in measured.items():
            if value is not None:
                rates[name].append(value)
        if not measured["direct"]:
            continue
        for name, kept in ratios.items():
            value = measured[name]
            if value is not None:
                kept.append(value / measured["direct"])
    return {
        "rounds": args.rounds, "max_tokens": args.max_tokens, "pinned": pinned,
        "load_before": args.load_before, "load_after": os.getloadavg(),
        "rates": {name: summary(r) for name, r in rates.items() if r},
        "ratios": {name: summary(r) for name, r in ratios.items() if r},
        "raw_ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--model", type=Path, default=MODEL_FILE)
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="leave every process on every CPU (the contended case)")
    parser.add_argument("--node", action="store_true", help="also the node's own port")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        args.pin = False
    args.load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for mesh in mesh_at(Path(tmp)):
            mesh.start_coordinator()
            mesh.key = mesh.make_key("rate")
            enrolled = mesh.enroll("node")
            if enrolled.returncode != 0:
                raise SystemExit(enrolled.stderr)
            mesh.start_node("node", f"{MODEL}={args.model}")
            mesh.wait_serving(MODEL)
            result = measure(args, mesh)
    print(f"load {result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}; pinned: "
          f"{result['pinned'] or 'no'}")
    for name, s in result["rates"].items():
        print(f"{name:12s} {s['median']:7.1f} tokens/s (median of {s['n']})")
    for name, s in result["ratios"].items():
        print(f"{name:12s} / direct: {s['median']:.4f} (median of {s['n']} per-round ratios; "
              f"quartiles {s['q1']:.4f}-{s['q3']:.4f}; {s['below_1']} below 1)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
