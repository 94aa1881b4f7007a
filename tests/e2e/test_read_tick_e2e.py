"""Read pacing end to end (node_agent/runtimes/read_tick.py): a node whose tick paces every
stream's reads (``stream_tick_streams`` 1, the 2 ms tick) in front of the FAKE instant
OpenAI upstream of the tests (chunks written well under a tick apart), a real coordinator
and tunnel on loopback, and the `openai` SDK: concurrent streams through the coordinator
see every chunk, field by field, as straight from the upstream. (Whether a given read
comes within a tick of the last depends on the box's timing here; the pacing itself is
pinned down in tests/node/test_read_tick.py.)"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.mesh import Mesh, Proc, free_port, mesh_at, wait_until

pytestmark = pytest.mark.slow

MODEL = "fast"
CHUNKS = 48
STREAMS = 6
FAKE_OPENAI = Path(__file__).resolve().parents[1] / "node" / "fake_openai_server.py"
HELLO: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "fake.log"
    proc = Proc(subprocess.Popen(
        [sys.executable, str(FAKE_OPENAI), "--port", str(port), "--name", MODEL,
         "--chunks", str(CHUNKS)], stdout=log.open("wb"), stderr=subprocess.STDOUT), log)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until(lambda: httpx.get(f"{url}/models").status_code == 200, 30, "fake upstream")
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, upstream: str) -> Iterator[Mesh]:
    for mesh in mesh_at(tmp_path_factory.mktemp("readtick")):
        mesh.start_coordinator()
        mesh.key = mesh.make_key("e2e")
        enrolled = mesh.enroll("node-a")
        assert enrolled.returncode == 0, enrolled.stderr
        mesh.start_node("node-a", extra=("--upstream", f"{MODEL}={upstream}"),
                        env={"MESHGATE_STREAM_TICK_STREAMS": "1",
                             "MESHGATE_STREAM_TICK_MS": "2"})
        mesh.wait_serving(MODEL)
        yield mesh


async def chunks_of(client: openai.AsyncOpenAI) -> list[dict[str, Any]]:
    stream = await client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=CHUNKS, stream=True,
        stream_options={"include_usage": True})
    return [chunk.model_dump() async for chunk in stream]


async def test_gathered_reads_reach_the_sdk_as_the_upstreams_chunks(
    mesh: Mesh, upstream: str
) -> None:
    direct = openai.AsyncOpenAI(base_url=upstream, api_key="unused", max_retries=0)
    meshed = openai.AsyncOpenAI(base_url=mesh.api, api_key=mesh.key, max_retries=0)
    try:
        want = await chunks_of(direct)
        assert len(want) == CHUNKS + 1  # the words, then the usage chunk
        got = await asyncio.gather(*(chunks_of(meshed) for _ in range(STREAMS)))
    finally:
        await direct.close()
        await meshed.close()
    for seen in got:
        assert seen == want  # every chunk, in order, field by field (the fake's id and time)
