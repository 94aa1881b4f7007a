"""Write pacing end to end (coordinator/write_tick.py): a coordinator told its loop runs
50 ms late (``MESHGATE_COORDINATOR_LAG_MS``: the lateness injected, so that pacing engages
whatever the box's speed) and to pace from one stream on (``[stream] tick_streams = 1``),
a real node and tunnel on loopback in front of the FAKE OpenAI upstream of the tests
writing a chunk every 10 ms (well within the 50 ms tick), and the `openai` SDK: concurrent
streams through the coordinator see every chunk, field by field, as straight from the
upstream, while the coordinator's /metrics show writes held and ticks fired."""

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
CHUNK_DELAY_S = 0.01  # 48 chunks over half a second at least: the probe engages well before the end
LAG_MS = 50
FAKE_OPENAI = Path(__file__).resolve().parents[1] / "node" / "fake_openai_server.py"
HELLO: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "fake.log"
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


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, upstream: str) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("writetick")
    config = root / "coordinator.toml"
    config.write_text("[stream]\ntick_streams = 1\n")
    for mesh in mesh_at(root):
        mesh.start_coordinator(env={"MESHGATE_COORDINATOR_CONFIG": str(config),
                                    "MESHGATE_COORDINATOR_LAG_MS": str(LAG_MS)})
        mesh.key = mesh.make_key("e2e")
        enrolled = mesh.enroll("node-a")
        assert enrolled.returncode == 0, enrolled.stderr
        mesh.start_node("node-a", extra=("--upstream", f"{MODEL}={upstream}"))
        mesh.wait_serving(MODEL)
        yield mesh


async def chunks_of(client: openai.AsyncOpenAI) -> list[dict[str, Any]]:
    stream = await client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=CHUNKS, stream=True,
        stream_options={"include_usage": True})
    return [chunk.model_dump() async for chunk in stream]


async def test_held_writes_reach_the_sdk_as_the_upstreams_chunks(
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
    metrics = pacing_of(mesh)
    assert metrics["meshgate_coordinator_write_pacing_engagements_total"] >= 1
    assert metrics["meshgate_coordinator_write_pacing_held_writes_total"] > 0
    assert metrics["meshgate_coordinator_write_pacing_ticks_total"] > 0
    assert metrics["meshgate_coordinator_write_pacing_streams"] == 0  # every stream ended


def pacing_of(mesh: Mesh) -> dict[str, float]:
    """The coordinator's write pacing figures from its /metrics."""
    text = httpx.get(f"http://127.0.0.1:{mesh.api_port}/metrics").text
    return {name: float(value) for name, _, value in
            (line.partition(" ") for line in text.splitlines())
            if name.startswith("meshgate_coordinator_write_pacing_")}
