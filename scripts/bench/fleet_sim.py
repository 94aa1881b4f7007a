"""The simulated nodes of scripts/bench/fleet.py: each a real tunnel client (Noise handshake,
encrypted frames, zstd) with its own hardware and models; it sends the typed inventory, then
telemetry every `period` seconds (jittered), and answers each request after its own synthetic
time. `sim_worker` runs a share of the fleet in one process (fleet.py --sim-worker SPEC)."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from meshgate.node_messages import (
    GpuInfo,
    HostInfo,
    Inventory,
    ModelInfo,
    ModelLoad,
    Telemetry,
    to_wire,
)
from tunnel import Frame, FrameType, Identity, Mux, Stream, TunnelError, connect

CATALOG = [f"model-{i:02}" for i in range(12)]
POPULAR = CATALOG[0]
GIB = 1 << 30


class SimNode:
    def __init__(self, identity: Identity, rng: random.Random) -> None:
        self.identity = identity
        self.gpus = rng.choice([0, 0, 1, 1, 2, 4, 8])
        self.vram = rng.choice([16, 24, 48, 80]) * GIB
        others = rng.sample(CATALOG[1:], rng.randint(1, 3))
        self.models = [POPULAR, *others]
        self.loaded = {m: rng.random() < 0.7 for m in self.models}
        self.loaded[POPULAR] = True
        self.decode = rng.uniform(200.0, 2000.0) if self.gpus else rng.uniform(50.0, 300.0)
        self.prefill = self.decode * rng.uniform(10, 40)
        self.capacity = rng.choice([1, 2, 4, 8]) if self.gpus else 1
        self.in_flight = 0

    def inventory(self) -> dict[str, Any]:
        return to_wire(Inventory(models=[
            ModelInfo(name=m, loaded=self.loaded[m], n_ctx=8192, memory_bytes=4 * GIB,
                      load_time_s=4.0, capacity=self.capacity) for m in self.models]))

    def telemetry(self) -> dict[str, Any]:
        gpus = [GpuInfo(index=i, name="SIM-GPU", vram_total_bytes=self.vram,
                        vram_free_bytes=self.vram // 2, gpu_util_pct=30.0)
                for i in range(self.gpus)]
        runtime = {m: ModelLoad(loaded=self.loaded[m], in_flight=self.in_flight if m == POPULAR
                                else 0, queued=0, prefill_tps=self.prefill,
                                decode_tps=self.decode, capacity=self.capacity)
                   for m in self.models}
        return to_wire(Telemetry(ts=time.time(), host=HostInfo(
            cpu_count=16, cpu_util_pct=20.0, mem_total_bytes=64 * GIB,
            mem_available_bytes=32 * GIB), gpus=gpus, runtime=runtime))

    async def answer(self, stream: Stream, frame: Frame) -> None:
        body = frame.body if isinstance(frame.body, dict) else {}
        service = 4 / self.decode
        self.in_flight += 1
        try:
            await asyncio.sleep(service)
        finally:
            self.in_flight -= 1
        reply = {"id": "chatcmpl-sim", "object": "chat.completion", "created": int(time.time()),
                 "model": body.get("model", POPULAR), "sim_service_s": service,
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": "one two three four"}}],
                 "usage": {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}}
        await stream.send(FrameType.DATA, json.dumps(reply).encode())
        await stream.send(FrameType.END, {"usage": reply["usage"]})


async def run_node(node: SimNode, url: str, key: bytes, gate: asyncio.Semaphore,
                   stats: dict[str, int], period: float) -> None:
    delay = 0.5
    while True:
        try:
            async with gate:
                link = await connect(url, node.identity, key, open_timeout=60)
            break
        except (TunnelError, OSError):
            stats["retries"] += 1
            await asyncio.sleep(delay * random.random())
            delay = min(delay * 2, 10.0)
    stats["connected"] += 1
    mux = Mux(link, initiator=True, on_stream=node.answer)
    task = asyncio.create_task(mux.run())
    await mux.send_control(FrameType.INVENTORY, node.inventory())
    await asyncio.sleep(random.random() * period)
    try:
        while not task.done():
            await mux.send_control(FrameType.TELEMETRY, node.telemetry())
            stats["telemetry"] += 1
            await asyncio.sleep(period)
    except TunnelError:
        stats["lost"] += 1


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def sim_worker(spec: dict[str, Any]) -> None:
    rng = random.Random(spec["seed"])
    nodes = [SimNode(Identity.from_bytes(bytes.fromhex(h)), rng) for h in spec["identities"]]
    stats = {"connected": 0, "retries": 0, "telemetry": 0, "lost": 0}
    gate = asyncio.Semaphore(64)
    key = bytes.fromhex(spec["key"])
    period = float(spec.get("period", 1.0))
    tasks = [asyncio.create_task(run_node(n, spec["url"], key, gate, stats, period))
             for n in nodes]
    out = Path(spec["stats"])
    while True:
        await asyncio.to_thread(write_atomic, out, json.dumps(stats))
        await asyncio.sleep(0.25)
        if all(t.done() for t in tasks):
            return
