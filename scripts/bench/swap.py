"""Hot-swap time against a cold start of the same runner, measured side by side.

    .venv/bin/python scripts/bench/swap.py [--model PATH.gguf] [--reps 5] [--json OUT.json]

Real parts only: our llama.cpp runner processes (``node_agent.runtimes.llama.worker``)
serving the GGUF (SmolLM2 from ``scripts/fetch_model.sh`` by default), under the
model manager. Two runner configs of the same file stand for two models:
``A`` (n_ctx 512) and ``B`` (n_ctx 1024). Each repetition, in turn:

* ``cold``: start a fresh runner with config B, then stream one completion;
  time from start to its first token;
* ``overlap``: the manager serves the name "chat" from A with room for both;
  ``swap("chat", B)``; time from the swap command to the first token of a
  streamed completion answered by the new runner (asked as soon as the manager
  routes "chat" to it); also when ``swap`` itself returned (old runner drained
  and stopped); then swap back to A, untimed;
* ``drain_first``: the same with a memory budget that holds only one of them,
  so the old runner is drained and stopped before the new one starts.

Prints the medians and the hot/cold ratios. A hot swap costs about a cold
start of the new runner (it must load the model too); what overlap buys is
that requests never wait meanwhile, and neither mode fails a request
(tests/node/test_swap.py checks that).

Measured 2026-11-24 on the shared 2-core dev box (SmolLM2-135M Q4_1, CPU only; five
other engineers' jobs running, load average 2.4-2.6, so single reps swing 0.6-3.5 s):
``.venv/bin/python scripts/bench/swap.py --reps 9``

    median cold start        -> first token: 0.829 s
    median hot swap, overlap -> first token: 1.037 s (ratio 1.25; swap returned 1.067 s)
    median hot swap, drain   -> first token: 0.886 s (ratio 1.07; swap returned 0.913 s)

In the four quietest reps (6-9): cold 0.63-0.82 s, overlap 0.66-0.88 s, drain-first
0.82-0.89 s: a hot swap costs a cold start of the new runner plus ~0.05 s (placement,
routing), and drain-first adds the old runner's shutdown (~0.2 s) on top. Earlier runs
under heavier load (load average 4.5-5.8): 5 reps cold 1.290 / overlap 1.121 /
drain-first 1.606 s; 7 reps (overlap only) cold 2.848 / overlap 3.266 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from node_agent.inventory import read_model_file  # noqa: E402
from node_agent.models import ModelManager  # noqa: E402
from node_agent.placement import Budget, place  # noqa: E402
from node_agent.runtimes.base import Runtime  # noqa: E402
from node_agent.runtimes.llama.supervisor import LlamaRunner  # noqa: E402

BODY = json.dumps(
    {
        "model": "chat",
        "prompt": "The capital of France is",
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
).encode()


async def first_token(runtime: Runtime) -> float:
    """Stream one completion; the perf_counter time of its first chunk (reads the rest)."""
    at = 0.0
    async for _ in runtime.stream("completions", BODY):
        at = at or time.perf_counter()
    return at


async def cold(model: Path, run_dir: Path) -> float:
    runner = LlamaRunner("chat", model, run_dir=run_dir, instance="cold", n_ctx=1024)
    began = time.perf_counter()
    await runner.start()
    try:
        return await first_token(runner.runtime) - began
    finally:
        await runner.stop()


async def hot(manager: ModelManager, model: Path, budget: Budget) -> tuple[float, float]:
    """Swap "chat" from A to B under `budget`: (to first token, to swap returned), in s."""
    manager.budget = budget
    old = manager.stats()["chat"]["runner"]
    began = time.perf_counter()
    swap = asyncio.create_task(manager.swap("chat", f"B={model}", n_ctx=1024))
    while manager.stats()["chat"]["runner"] == old or manager.stats()["chat"]["state"] != "loaded":
        if swap.done():
            swap.result()  # raises if the swap failed
        await asyncio.sleep(0.002)
    async with manager.use("chat") as runtime:
        token = await first_token(runtime) - began
    await swap
    returned = time.perf_counter() - began
    await manager.swap("chat", f"A={model}", n_ctx=512)  # back, untimed
    return token, returned


def need(model: Path, n_ctx: int) -> int:
    return place([read_model_file(model)], n_ctx, Budget(1 << 40, 0)).ram_bytes


async def bench(model: Path, reps: int) -> dict[str, Any]:
    roomy = Budget(8 << 30, 0)  # A and B fit side by side: overlap
    tight = Budget(max(need(model, 512), need(model, 1024)) + (1 << 20), 0)  # one: drain-first
    runs: dict[str, list[float]] = {
        k: []
        for k in ("cold", "overlap", "overlap_returned", "drain_first", "drain_first_returned")
    }
    with tempfile.TemporaryDirectory(prefix="mg-swap-") as tmp:
        run_dir = Path(tmp)
        manager = ModelManager(run_dir=run_dir, budget=roomy)
        manager.add_llama("chat", model, n_ctx=512)
        await manager.start()
        try:
            async with manager.use("chat") as runtime:
                await first_token(runtime)  # warm: the file in the page cache, the path
            for i in range(reps):
                runs["cold"].append(await cold(model, run_dir))
                for mode, budget in (("overlap", roomy), ("drain_first", tight)):
                    token, returned = await hot(manager, model, budget)
                    runs[mode].append(token)
                    runs[f"{mode}_returned"].append(returned)
                print(
                    f"rep {i + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in runs.items()),
                    flush=True,
                )
        finally:
            await manager.stop()
    medians = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    return {
        "model": str(model),
        "reps": reps,
        "runs_s": runs,
        "median_s": medians,
        "ratio_overlap_over_cold": round(medians["overlap"] / medians["cold"], 3),
        "ratio_drain_first_over_cold": round(medians["drain_first"] / medians["cold"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF file [SmolLM2]")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = args.model or Path(
        subprocess.run(
            [str(ROOT / "scripts" / "fetch_model.sh")],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    result = asyncio.run(bench(model, args.reps))
    m = result["median_s"]
    print(f"median cold start        -> first token: {m['cold']:.3f} s")
    print(
        f"median hot swap, overlap -> first token: {m['overlap']:.3f} s "
        f"(ratio {result['ratio_overlap_over_cold']:.2f}; "
        f"swap returned {m['overlap_returned']:.3f} s)"
    )
    print(
        f"median hot swap, drain   -> first token: {m['drain_first']:.3f} s "
        f"(ratio {result['ratio_drain_first_over_cold']:.2f}; swap returned "
        f"{m['drain_first_returned']:.3f} s)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
