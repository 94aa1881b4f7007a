"""Read pacing end to end (node_agent/runtimes/read_tick.py): a node told its loop runs
50 ms late (``MESHGATE_STREAM_LAG_MS``: the lateness injected, so that pacing engages
whatever the box's speed) and to pace from one stream on, in front of the FAKE OpenAI
upstream of the tests writing a chunk every 10 ms (well within the 50 ms tick), a real
coordinator and tunnel on loopback, and the `openai` SDK: concurrent streams through the
coordinator see every chunk, field by field, as straight from the upstream, while the
node's /metrics show reads paused and ticks fired."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.mesh import Mesh, mesh_at
from tests.e2e.paced_streams import CHUNKS, LAG_MS, MODEL, direct_and_meshed, figures, slow_upstream

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with slow_upstream(tmp_path_factory.mktemp("upstream")) as url:
        yield url


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, upstream: str) -> Iterator[Mesh]:
    for mesh in mesh_at(tmp_path_factory.mktemp("readtick")):
        mesh.start_coordinator()
        mesh.key = mesh.make_key("e2e")
        enrolled = mesh.enroll("node-a")
        assert enrolled.returncode == 0, enrolled.stderr
        mesh.start_node("node-a", extra=("--upstream", f"{MODEL}={upstream}"),
                        env={"MESHGATE_STREAM_TICK_STREAMS": "1",
                             "MESHGATE_STREAM_LAG_MS": str(LAG_MS)})
        mesh.wait_serving(MODEL)
        yield mesh


async def test_gathered_reads_reach_the_sdk_as_the_upstreams_chunks(
    mesh: Mesh, upstream: str
) -> None:
    want, got = await direct_and_meshed(mesh, upstream)
    assert len(want) == CHUNKS + 1  # the words, then the usage chunk
    for seen in got:
        assert seen == want  # every chunk, in order, field by field (the fake's id and time)
    metrics = figures(mesh.proxy_ports["node-a"], "meshgate_node_read_pacing_")
    assert metrics["meshgate_node_read_pacing_engagements_total"] >= 1
    assert metrics["meshgate_node_read_pacing_paused_reads_total"] > 0
    assert metrics["meshgate_node_read_pacing_ticks_total"] > 0
    assert metrics["meshgate_node_read_pacing_streams"] == 0  # every stream's reading ended
