"""Streamed tokens per second of the real SmolLM2: through the coordinator and the tunnel
against the node's own OpenAI port, side by side in one run.

    .venv/bin/python scripts/bench/stream_rate.py [--rounds 7] [--max-tokens 96]

Starts a real coordinator and a real enrolled node serving SmolLM2 (llama.cpp runner)
in a temporary directory on loopback, then streams the same completion (temperature 0)
through both ports, interleaved so that drift hits both alike. The rate is counted from
the first token to the last (the time to the first token is the overhead bench's job);
the first round is a warm-up. Prints the median rate of each port and their ratio.
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

import openai  # noqa: E402

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
            clients = {
                "coordinator": openai.OpenAI(base_url=mesh.api, api_key=mesh.key, max_retries=0),
                "node": openai.OpenAI(base_url=mesh.proxy("node"), api_key="-", max_retries=0),
            }
            rates: dict[str, list[float]] = {name: [] for name in clients}
            for round_ in range(args.rounds):
                for name, client in clients.items():
                    measured = rate(client, args.max_tokens)
                    if round_ and measured is not None:
                        rates[name].append(measured)
            median = {name: statistics.median(r) for name, r in rates.items() if r}
    for name, value in median.items():
        print(f"{name:12s} {value:8.1f} tokens/s (median of {len(rates[name])})")
    if len(median) == 2:
        print(f"coordinator / node: {median['coordinator'] / median['node']:.3f}")


if __name__ == "__main__":
    main()
