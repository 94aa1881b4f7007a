"""What embeddings cost in memory: one llama.cpp runner, before and after its first embedding.

    .venv/bin/python scripts/bench/embed_memory.py [--model PATH.gguf] [--n-ctx 2048]

Starts our runner (``node_agent.runtimes.llama.worker``) on the GGUF (SmolLM2 from
``scripts/fetch_model.sh`` by default) and reads the runner process's RSS and USS
(memory only it holds; the mmap'd weights shared by its two contexts count once)
with psutil at three points: after one chat completion (the generating context
only), after a first short embedding (the embeddings context opened, see
``node_agent/runtimes/llama/embed.py``), and after an embedding of an input
near the context's length (its compute buffers at their largest).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]


def default_model() -> str:
    out = subprocess.run([str(ROOT / "scripts" / "fetch_model.sh")], capture_output=True,
                         text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def mib(proc: psutil.Process) -> dict[str, float]:
    info = proc.memory_full_info()
    return {"rss_mib": round(info.rss / 2**20, 1), "uss_mib": round(info.uss / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--embed-n-ctx", type=int, default=512)
    args = parser.parse_args()
    model = args.model or default_model()
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "runner.sock"
        runner = subprocess.Popen(
            [sys.executable, "-m", "node_agent.runtimes.llama.worker", "--model", model,
             "--uds", str(sock), "--name", "m", "--n-ctx", str(args.n_ctx),
             "--embed-n-ctx", str(args.embed_n_ctx),
             "--log-level", "warning"], cwd=ROOT)
        try:
            client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                                  base_url="http://runner", timeout=300)
            deadline = time.monotonic() + 120
            while not sock.exists():
                if time.monotonic() > deadline or runner.poll() is not None:
                    sys.exit("the runner did not start")
                time.sleep(0.1)
            proc = psutil.Process(runner.pid)
            post: Any = client.post
            post("/v1/chat/completions", json={"model": "m", "max_tokens": 8, "messages": [
                {"role": "user", "content": "Say hello."}]}).raise_for_status()
            report = {"generating_only": mib(proc)}
            post("/v1/embeddings", json={"model": "m", "input": ["hello", "world"]}
                 ).raise_for_status()
            report["after_first_embedding"] = mib(proc)
            long_text = "memory " * int(min(args.embed_n_ctx, args.n_ctx) * 0.9)
            post("/v1/embeddings", json={"model": "m", "input": long_text}).raise_for_status()
            report["after_long_embedding"] = mib(proc)
            base = report["generating_only"]
            report["embeddings_cost_mib"] = {
                k: round(report["after_long_embedding"][k] - base[k], 1) for k in base}
            report["n_ctx"], report["embed_n_ctx"] = args.n_ctx, args.embed_n_ctx
            report["model"] = os.path.basename(model)
            print(json.dumps(report, indent=2))
        finally:
            runner.terminate()
            runner.wait(10)


if __name__ == "__main__":
    main()
