"""Streamed tokens per second of the real SmolLM2: through the coordinator and the tunnel,
through the node's own OpenAI port, and straight from its llama.cpp runner, side by side.

    .venv/bin/python scripts/bench/stream_rate.py [--rounds 7] [--max-tokens 96]

Starts a real coordinator and a real enrolled node serving SmolLM2 (llama.cpp runner)
in a temporary directory on loopback, then streams the same completion (temperature 0)
through the three, interleaved (the order turns every round) so that drift hits all alike.
The rate is counted from the first token to the last (the time to the first token is the
overhead bench's job); the first round is a warm-up. Prints the median rate of each path,
and each path's ratio to ``direct`` as the median of the per-round ratios (a round's
paths ran back to back, so a slow spell of the shared box cancels out of its ratio).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import openai  # noqa: E402

from node_agent.runtimes.llama.supervisor import socket_path  # noqa: E402
from tests.e2e.mesh import mesh_at  # noqa: E402

MODEL = "smollm2"
MODEL_FILE = Path.home() / ".cache" / "meshgate" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def rate(client: openai.OpenAI, max_tokens: int) -> float | None:
    first: float | None = None
    tokens = 0
    for chunk in client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,",
                                           max_tokens=max_tokens, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].text:
            tokens += 1
            if first is None:
                first = time.perf_counter()
    if first is None or tokens < 2:
        return None
    return (tokens - 1) / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--model", type=Path, default=MODEL_FILE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for mesh in mesh_at(Path(tmp)):
            mesh.start_coordinator()
            mesh.key = mesh.make_key("rate")
            enrolled = mesh.enroll("node")
            if enrolled.returncode != 0:
                raise SystemExit(enrolled.stderr)
            mesh.start_node("node", f"{MODEL}={args.model}")
            mesh.wait_serving(MODEL)
            base = mesh.proxy("node").removesuffix("/v1")
            runner = httpx.get(base + "/meshgate/telemetry").json()["runtime"][MODEL]["runner"]
            sock = socket_path(mesh.root / "node" / "run", runner)
            clients = {
                "direct": openai.OpenAI(
                    base_url="http://runner/v1", api_key="-", max_retries=0,
                    http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)))),
                "node": openai.OpenAI(base_url=mesh.proxy("node"), api_key="-", max_retries=0),
                "coordinator": openai.OpenAI(base_url=mesh.api, api_key=mesh.key, max_retries=0),
            }
            rates: dict[str, list[float]] = {name: [] for name in clients}
            ratios: dict[str, list[float]] = {name: [] for name in clients if name != "direct"}
            names = list(clients)
            for round_ in range(args.rounds):
                measured: dict[str, float | None] = {}
                for name in names[round_ % 3:] + names[:round_ % 3]:
                    measured[name] = rate(clients[name], args.max_tokens)
                if not round_:
                    continue  # warm-up
                for name, value in measured.items():
                    if value is not None:
                        rates[name].append(value)
                direct = measured["direct"]
                for name, kept in ratios.items():
                    value = measured[name]
                    if value is not None and direct:
                        kept.append(value / direct)
            median = {name: statistics.median(r) for name, r in rates.items() if r}
    for name, value in median.items():
        print(f"{name:12s} {value:8.1f} tokens/s (median of {len(rates[name])})")
    for name, values in ratios.items():
        if values:
            spread = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
            print(f"{name} / direct: {statistics.median(values):.4f} (median of {len(values)} "
                  f"per-round ratios; quartiles {spread[0]:.4f}-{spread[2]:.4f})")


if __name__ == "__main__":
    main()
