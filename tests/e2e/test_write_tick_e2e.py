"""Write pacing end to end (coordinator/write_tick.py): a coordinator told its loop runs
50 ms late (``MESHGATE_COORDINATOR_LAG_MS``: the lateness injected, so that pacing engages
whatever the box's speed) and to pace from one stream on (``[stream] tick_streams = 1``),
a real node and tunnel on loopback in front of the FAKE OpenAI upstream of the tests
writing a chunk every 10 ms (well within the 50 ms tick), and the `openai` SDK: concurrent
streams through the coordinator see every chunk, field by field, as straight from the
upstream, while the coordinator's /metrics show writes held and ticks fired."""

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


async def test_held_writes_reach_the_sdk_as_the_upstreams_chunks(
    mesh: Mesh, upstream: str
) -> None:
    want, got = await direct_and_meshed(mesh, upstream)
    assert len(want) == CHUNKS + 1  # the words, then the usage chunk
    for seen in got:
        assert seen == want  # every chunk, in order, field by field (the fake's id and time)
    metrics = figures(mesh.api_port, "meshgate_coordinator_write_pacing_")
    assert metrics["meshgate_coordinator_write_pacing_engagements_total"] >= 1
    assert metrics["meshgate_coordinator_write_pacing_held_writes_total"] > 0
    assert metrics["meshgate_coordinator_write_pacing_ticks_total"] > 0
    assert metrics["meshgate_coordinator_write_pacing_streams"] == 0  # every stream ended
