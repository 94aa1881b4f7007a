"""Relayed requests (apps on a node's box, no API key) get a quota per node and a share of
the dispatch queue beside keyed traffic, each refusal a ledger row, and no paid cloud by
default: one node's flood cannot starve an app with a key (real coordinator process,
malicious nodes on the real tunnel library)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.ledger_journal import JOURNAL_DIR
from coordinator.state import StateDir
from coordinator.store import Store
from tests.e2e.evil_node import EvilNode, completion, drain
from tests.e2e.mesh import Mesh, Proc, free_port, mesh_at, wait_until
from tunnel import Frame, FrameType, Stream

pytestmark = pytest.mark.slow

CONFIG = """
[dispatch]
node_slots = 2
queue_size = 8

[relay]
per_node = 4
queue_share = 0.5
"""
HELLO: list[Any] = [{"role": "user", "content": "hi"}]
FAKE_OPENAI = Path(__file__).resolve().parents[1] / "node" / "fake_openai_server.py"


def spawn_script(script: Path, args: list[str], log: Path) -> Proc:
    popen = subprocess.Popen([sys.executable, str(script), *args], stdout=log.open("wb"),
                             stderr=subprocess.STDOUT)
    return Proc(popen, log)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("relayquota")
    config = root / "coordinator.toml"
    config.write_text(CONFIG)
    for mesh in mesh_at(root):
        mesh.start_coordinator("--config", str(config))
        mesh.key = mesh.make_key("keyed")
        yield mesh


def rows(mesh: Mesh) -> list[Any]:
    store = Store(StateDir(mesh.coord_state).db_url)
    try:
        return store.usage_rows_durable(mesh.coord_state / JOURNAL_DIR)
    finally:
        store.close()


async def test_one_nodes_relay_flood_does_not_starve_a_keyed_app(mesh: Mesh,
                                                                 tmp_path: Path) -> None:
    release = asyncio.Event()
    worker = await EvilNode.start(mesh, "worker", ["slow"])

    async def answer(stream: Stream, frame: Frame) -> None:
        await release.wait()
        await stream.send(FrameType.DATA, completion("done", "slow"))
        await stream.send(FrameType.END, {"usage": {"prompt_tokens": 1,
                                                    "completion_tokens": 1}})

    worker.answer = answer
    asker = await EvilNode.start(mesh, "asker", [])
    try:
        await asyncio.to_thread(mesh.wait_serving, "slow", 10)
        streams = [await asker.ask({"model": "slow", "messages": HELLO},
                                   request_id=f"flood-{i}") for i in range(30)]
        first = {asyncio.create_task(s.recv()): s for s in streams}
        pending = set(first)
        async with asyncio.timeout(10):  # refusals are answered at once
            while len(pending) > 4:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        refused = [t.result() for t in first if t not in pending]
        assert len(refused) == 26
        assert all(f.type == FrameType.ERROR and f.body["status"] == 429 for f in refused)
        assert {f.body["code"] for f in refused} == {"relay_quota"}
        async with httpx.AsyncClient(timeout=30) as client:
            keyed = asyncio.create_task(client.post(
                f"{mesh.api}/chat/completions", json={"model": "slow", "messages": HELLO},
                headers={"Authorization": f"Bearer {mesh.key}", "X-Request-Id": "keyed-1"}))
            await asyncio.sleep(0.5)  # it waits in the queue, not refused
            assert not keyed.done()
            release.set()
            reply = await keyed
        assert reply.status_code == 200, reply.text
        admitted = [await t for t in pending]
        assert [f.type for f in admitted] == [FrameType.DATA] * 4, [f.body for f in admitted]
        for task in pending:
            frames = await drain(first[task])
            assert frames[-1].type == FrameType.END
        ledger = await asyncio.to_thread(rows, mesh)
        outcomes = [r.outcome for r in ledger if r.request_id.startswith("flood-")]
        assert sorted(outcomes) == ["ok"] * 4 + ["relay_quota"] * 26
        assert all(r.key_id is None and (r.route or "").startswith(f"node:{asker.did}")
                   for r in ledger if r.request_id.startswith("flood-"))
    finally:
        release.set()
        await asker.close()
        await worker.close()


async def test_relayed_requests_never_reach_a_paid_cloud_by_default(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A node's local port takes requests from any local program without a key, so what it
    relays may not spend cloud money unless the coordinator's [relay] cloud = true."""
    root = tmp_path_factory.mktemp("relaycloud")
    port = free_port()
    cloud = spawn_script(FAKE_OPENAI, ["--port", str(port), "--name", "paid"], root / "cloud.log")
    try:
        await asyncio.to_thread(wait_until, lambda: httpx.get(
            f"http://127.0.0.1:{port}/health").status_code == 200, 30, "fake cloud", [cloud])
        config = root / "coordinator.toml"
        config.write_text(f"""
[[upstream]]
name = "paid"
base_url = "http://127.0.0.1:{port}/v1"
api_key_env = "PAID_KEY"
models = {{ cloudy = "paid" }}
""")
        for mesh in mesh_at(root):
            await asyncio.to_thread(mesh.start_coordinator, "--config", str(config),
                                    env={"PAID_KEY": "sk-fake"})
            mesh.key = await asyncio.to_thread(mesh.make_key, "keyed")
            asker = await EvilNode.start(mesh, "asker", [])
            try:
                frames = await drain(await asker.ask({"model": "cloudy", "messages": HELLO},
                                                     request_id="relay-cloud"))
                assert frames[-1].type == FrameType.ERROR
                assert frames[-1].body["status"] == 503
                assert "[relay] cloud = true" in frames[-1].body["message"]
                async with httpx.AsyncClient(timeout=30) as client:  # a keyed app may
                    reply = await client.post(
                        f"{mesh.api}/chat/completions", json={"model": "cloudy",
                                                              "messages": HELLO},
                        headers={"Authorization": f"Bearer {mesh.key}"})
                assert reply.status_code == 200, reply.text
                assert reply.headers["x-meshgate-upstream"] == "paid"
            finally:
                await asker.close()
    finally:
        cloud.stop()
