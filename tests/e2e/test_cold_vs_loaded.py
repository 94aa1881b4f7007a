"""Two real nodes with one model: loaded on one, only on disk on the other (unloaded on
its local port after start). Requests go to the loaded one while it has room; once its
queue is full the other loads the model."""

from __future__ import annotations

import concurrent.futures
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.mesh import Mesh, mesh_at, wait_until

pytestmark = pytest.mark.slow

MODEL = "smollm2"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("coldload")
    disk = root / "models-b"
    disk.mkdir()
    (disk / f"{MODEL}.gguf").symlink_to(model_path)
    for mesh in mesh_at(root):
        mesh.start_coordinator()
        mesh.key = mesh.make_key("coldload")
        for node in ("loaded", "on-disk"):
            assert mesh.enroll(node).returncode == 0
        mesh.start_node("loaded", f"{MODEL}={model_path}")
        mesh.start_node("on-disk", extra=("--model-dir", str(disk)))
        mesh.wait_serving(MODEL)
        wait_until(lambda m=mesh: m.connected_nodes() == 2, 60, "both nodes connected")  # type: ignore[misc]
        base = mesh.proxy("on-disk").removesuffix("/v1")
        wait_until(lambda b=base: httpx.post(f"{b}/meshgate/unload", json={"model": MODEL},  # type: ignore[misc]
                                             timeout=60).status_code == 200, 60, "unloaded")
        wait_until(lambda m=mesh: loaded_on(m) == 1, 30, "the coordinator sees one loaded")  # type: ignore[misc]
        # the first inference of a fresh runner is slow; warm it on its own port so that what
        # the coordinator measures is the model's speed, not the warm-up
        warm = httpx.post(f"{mesh.proxy('loaded')}/completions", timeout=120,
                          json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "stream": False})
        assert warm.status_code == 200
        yield mesh


def loaded_on(mesh: Mesh) -> int:
    lives = [node.get("live") or {} for node in mesh.nodes_json()]
    return sum(MODEL in (live.get("loaded") or []) for live in lives)  # type: ignore[union-attr,operator]


def ask(mesh: Mesh, max_tokens: int) -> str:
    """One streamed completion (the node then measures its prefill and decode rates);
    returns the node that answered."""
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{mesh.api}/completions", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {mesh.key}"}) as reply:
        assert reply.status_code == 200, reply.read()
        assert any(line == "data: [DONE]" for line in reply.iter_lines())
        return reply.headers["x-meshgate-node"]


def runners_started(mesh: Mesh, node: str) -> int:
    run = mesh.root / node / "run"
    return sum(log.read_text().count("--- ") for log in run.glob(f"{MODEL}*.log"))


def test_the_loaded_node_serves_until_its_queue_makes_the_cold_load_worth_it(
        mesh: Mesh) -> None:
    before = runners_started(mesh, "on-disk")
    served = [ask(mesh, 4) for _ in range(4)]
    assert len(set(served)) == 1  # one after the other: the loaded node, every time
    loaded = served[0]
    assert runners_started(mesh, "on-disk") == before  # nothing was loaded on the other
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        burst = Counter(pool.map(lambda _: ask(mesh, 48), range(10)))
    # the loaded node took the first of them; once its queue made a request wait longer
    # than a cold load plus the answer, the other node loaded the model (once) and shared
    assert burst[loaded] >= 2, burst
    assert len(burst) == 2, burst
    assert runners_started(mesh, "on-disk") == before + 1  # one cold load
