"""How late a node's event loop runs (read pacing's lag) under light loads, from its /metrics.

    .venv/bin/python scripts/bench/pacing_lag.py [--reps 5]

Read pacing (node_agent/runtimes/read_tick.py) engages once the node's loop runs
``stream_tick_engage_ms`` (default 2 ms) late, smoothed. This shows what a node that keeps
up reads, so the threshold can be judged: a real coordinator and an enrolled node serving
SmolLM2 (llama.cpp runner) and the FAKE OpenAI upstream of the tests (64 chunks, 10 ms
apart), with the stream floor at 1 (``MESHGATE_STREAM_TICK_STREAMS=1``) so that the probe
runs for a lone stream too. For each load (a lone fake stream, 8 fake streams, a lone
SmolLM2 stream, 4 SmolLM2 streams; ``--reps`` times each, on the node's own port) it scrapes
the node's /metrics every 50 ms while streams are read and prints the smoothed lag's
quartiles and maximum, the scrapes that found pacing engaged, and the engagements and
reads paused in all. The default floor (16 streams) keeps these loads unpaced whatever the
lag; report ``uptime`` beside the figures (other work on the box makes the loop late).
Loopback only, ephemeral ports, every stream bounded (120 s).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import openai  # noqa: E402

from tests.e2e.mesh import Proc, free_port, mesh_at, wait_until  # noqa: E402

MODEL_FILE = Path.home() / ".cache" / "meshgate" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
FAKE = ROOT / "tests" / "node" / "fake_openai_server.py"
PREFIX = "meshgate_node_read_pacing_"
PROMPT: list[Any] = [{"role": "user", "content": "Count: 1, 2, 3,"}]


async def scrape(port: int, stop: asyncio.Event, out: list[dict[str, float]]) -> None:
    """The pacing figures every 50 ms while at least one stream is read."""
    async with httpx.AsyncClient() as client:
        while not stop.is_set():
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            got = {name[len(PREFIX):]: float(value) for name, _, value in
                   (line.partition(" ") for line in text.splitlines())
                   if name.startswith(PREFIX)}
            if got.get("streams", 0) > 0:
                out.append(got)
            await asyncio.sleep(0.05)


async def streams(base: str, model: str, n: int, reps: int) -> None:
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)

    async def one() -> None:
        stream = await client.chat.completions.create(
            model=model, messages=PROMPT, max_tokens=64, stream=True, temperature=0)
        async for _ in stream:
            pass

    try:
        for _ in range(reps):
            await asyncio.gather(*(one() for _ in range(n)))
    finally:
        await client.close()


async def measure(port: int, model: str, n: int, reps: int) -> None:
    out: list[dict[str, float]] = []
    stop = asyncio.Event()
    scraping = asyncio.create_task(scrape(port, stop, out))
    await streams(f"http://127.0.0.1:{port}/v1", model, n, reps)
    stop.set()
    await scraping
    if not out:
        print(f"{model} x{n}: no scrape saw a stream")
        return
    lag = sorted(row["lag_seconds"] * 1000 for row in out)

    def at(p: float) -> float:
        return lag[min(len(lag) - 1, int(p * len(lag)))]

    print(f"{model} x{n}: {len(out)} scrapes; smoothed lag ms p25 {at(0.25):.2f}, p50 "
          f"{at(0.5):.2f}, p75 {at(0.75):.2f}, max {lag[-1]:.2f}; engaged in "
          f"{sum(row['engaged'] for row in out):.0f} scrapes; engagements "
          f"{out[-1]['engagements_total']:.0f}, reads paused {out[-1]['paused_reads_total']:.0f}"
          " (totals so far)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--model", type=Path, default=MODEL_FILE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mg-lag-") as tmp:
        root = Path(tmp)
        fake_port = free_port()
        log = root / "fake.log"
        fake = Proc(subprocess.Popen(
            [sys.executable, str(FAKE), "--port", str(fake_port), "--name", "fake",
             "--chunks", "64", "--chunk-delay", "0.01"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT), log)
        try:
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{fake_port}/v1/models")
                       .status_code == 200, 30, "fake upstream")
            for mesh in mesh_at(root):
                mesh.start_coordinator()
                mesh.key = mesh.make_key("lag")
                enrolled = mesh.enroll("node")
                if enrolled.returncode != 0:
                    raise SystemExit(enrolled.stderr)
                mesh.start_node("node", f"smollm2={args.model}",
                                extra=("--upstream", f"fake=http://127.0.0.1:{fake_port}/v1"),
                                env={"MESHGATE_STREAM_TICK_STREAMS": "1"})
                mesh.wait_serving("smollm2")
                port = mesh.proxy_ports["node"]
                for model, n in (("fake", 1), ("fake", 8), ("smollm2", 1), ("smollm2", 4)):
                    asyncio.run(measure(port, model, n, args.reps))
        finally:
            fake.stop()


if __name__ == "__main__":
    main()
