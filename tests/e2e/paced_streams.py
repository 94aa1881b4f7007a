"""What the two pacing end-to-end tests share (test_read_tick_e2e: the node's reads;
test_write_tick_e2e: the coordinator's writes): the FAKE OpenAI upstream of the tests
writing a chunk every 10 ms, well within the 50 ms lateness the tests inject so that
pacing engages whatever the box's speed; concurrent streams through the mesh and one
straight from the upstream, read with the `openai` SDK; a process's pacing figures from
its /metrics."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.e2e.mesh import Mesh, Proc, free_port, wait_until

MODEL = "fast"
CHUNKS = 48
STREAMS = 6
CHUNK_DELAY_S = 0.01  # 48 chunks over half a second at least: the probe engages well before the end
LAG_MS = 50
FAKE_OPENAI = Path(__file__).resolve().parents[1] / "node" / "fake_openai_server.py"
HELLO: list[Any] = [{"role": "user", "content": "hi"}]


@contextmanager
def slow_upstream(directory: Path) -> Iterator[str]:
    """The fake upstream's base URL while it runs (its log in `directory`)."""
    port = free_port()
    log = directory / "fake.log"
    proc = Proc(subprocess.Popen(
        [sys.executable, str(FAKE_OPENAI), "--port", str(port), "--name", MODEL,
         "--chunks", str(CHUNKS), "--chunk-delay", str(CHUNK_DELAY_S)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT), log)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until(lambda: httpx.get(f"{url}/models").status_code == 200, 30, "fake upstream")
        yield url
    finally:
        proc.stop()


async def chunks_of(client: openai.AsyncOpenAI) -> list[dict[str, Any]]:
    stream = await client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=CHUNKS, stream=True,
        stream_options={"include_usage": True})
    return [chunk.model_dump() async for chunk in stream]


async def direct_and_meshed(mesh: Mesh, upstream: str
                            ) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """One stream's chunks straight from `upstream`, then STREAMS concurrent streams'
    through `mesh`."""
    direct = openai.AsyncOpenAI(base_url=upstream, api_key="unused", max_retries=0)
    meshed = openai.AsyncOpenAI(base_url=mesh.api, api_key=mesh.key, max_retries=0)
    try:
        want = await chunks_of(direct)
        got = await asyncio.gather(*(chunks_of(meshed) for _ in range(STREAMS)))
    finally:
        await direct.close()
        await meshed.close()
    return want, list(got)


def figures(port: int, prefix: str) -> dict[str, float]:
    """The /metrics figures on `port` whose names start with `prefix`."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return {name: float(value) for name, _, value in
            (line.partition(" ") for line in text.splitlines())
            if name.startswith(prefix)}
