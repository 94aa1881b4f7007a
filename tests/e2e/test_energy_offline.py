"""Energy per request and usage kept while offline, end to end: a real coordinator and a
real node (subprocesses), the node's tunnel through the fault proxy. The node's GPU is the
FAKE NVML (one recorded H100 at 71 W whose energy counter moves with the clock): this box
has no GPU, and its RAPL counters are not readable. The node serves the real SmolLM2 in a
llama.cpp runner, placed on the CPU (placement reads the real NVML: no GPU), so metered on
the CPU's meters alone: none readable here, so "not measured". It also serves
``gpu-model`` through its upstream runtime from the FAKE OpenAI server (standing in for a
local GPU server such as vLLM): an upstream may use every device, so its requests share the
fake GPU's energy.

1. A request through the coordinator: its ledger row carries the joules the node measured
   and their cost at the node's electricity price; /metrics counts them.
2. The tunnel is cut: the node answers its local port and journals each request; when the
   tunnel is back, the ledger holds each exactly once, route "offline".
3. The node is killed (SIGKILL) after the coordinator ingested its upload but before the
   node read the answer (a slow link makes that window); restarted, it sends the rows
   again and the ledger still holds each exactly once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from coordinator.ledger_journal import JOURNAL_DIR
from coordinator.state import StateDir
from coordinator.store import Store, UsageRecord
from node_agent.journal import ACKED, JOURNAL
from tests.e2e.mesh import Mesh, free_port, mesh_at, wait_until
from tests.faultproxy import ThreadedFaultProxy

pytestmark = pytest.mark.slow

MODEL = "smollm2"
GPU_MODEL = "gpu-model"
FAKE_SERVER = Path(__file__).resolve().parents[1] / "node" / "fake_openai_server.py"
HELLO: list[Any] = [{"role": "user", "content": "Say hello."}]
PRICE = 0.30  # per kWh
NODE_ENV = {
    "MESHGATE_NVML_MODULE": "tests.node.fake_nvml:h100_moving_energy",
    "MESHGATE_ELECTRICITY_PRICE_PER_KWH": str(PRICE),
}


class Rig:
    def __init__(
        self, mesh: Mesh, proxy: ThreadedFaultProxy, model_path: Path, upstream: str
    ) -> None:
        self.mesh, self.proxy, self.model_path, self.upstream = mesh, proxy, model_path, upstream

    def start_node(self) -> None:
        self.mesh.start_node(
            "node-a", f"{MODEL}={self.model_path}",
            extra=("--n-ctx", "512", "--upstream", f"{GPU_MODEL}={self.upstream}"),
            env=NODE_ENV)

    @property
    def node_state(self) -> Path:
        return self.mesh.root / "node-a"

    def ledger(self) -> list[UsageRecord]:
        store = Store(StateDir(self.mesh.coord_state).db_url)
        try:
            return store.usage_rows_durable(self.mesh.coord_state / JOURNAL_DIR)
        finally:
            store.close()

    def offline_rows(self) -> list[UsageRecord]:
        return [r for r in self.ledger() if r.route == "offline"]

    def local(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.mesh.proxy("node-a"), api_key="-", max_retries=0,
                             timeout=60)

    def node_sees_coordinator(self) -> bool:
        """A model the node lacks goes to the coordinator only while the tunnel is up."""
        reply = httpx.post(f"{self.mesh.proxy('node-a')}/chat/completions", timeout=10,
                           json={"model": "no-such-model", "messages": HELLO})
        return bool(reply.json()["error"].get("hop") == "coordinator")

    def cut(self) -> None:
        self.proxy.refuse()
        self.proxy.drop()
        wait_until(lambda: self.mesh.connected_nodes() == 0 and not self.node_sees_coordinator(),
                   30, "the tunnel down on both sides", self.procs())

    def procs(self) -> list[Any]:
        return [p for p in [self.mesh.coordinator, *self.mesh.nodes.values()] if p is not None]

    def serve_locally(self, *models: str) -> None:
        for model in models:
            reply = self.local().chat.completions.create(model=model, messages=HELLO,
                                                         max_tokens=4)
            assert reply.choices[0].message.content is not None

    def journal_pending(self) -> bool:
        journal = self.node_state / JOURNAL
        if not journal.exists():
            return False
        acked = self.node_state / ACKED
        return (int(acked.read_text()) if acked.exists() else 0) < journal.stat().st_size


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, str(FAKE_SERVER), "--port", str(port),
                               "--name", GPU_MODEL, "--chunks", "4"])
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200,
                   30, "the fake upstream")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.kill()
        server.wait(10)


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, model_path: Path, upstream: str
) -> Iterator[Rig]:
    for mesh in mesh_at(tmp_path_factory.mktemp("energy")):
        mesh.start_coordinator()
        mesh.key = mesh.make_key("energy")
        proxy = ThreadedFaultProxy("127.0.0.1", mesh.tunnel_port)
        port = proxy.start()
        assert mesh.enroll("node-a", mesh.token("--tunnel-url", f"ws://127.0.0.1:{port}")
                           ).returncode == 0
        rig = Rig(mesh, proxy, model_path, upstream)
        rig.start_node()
        mesh.wait_serving(MODEL)
        try:
            yield rig
        finally:
            proxy.stop()


def test_a_request_through_the_coordinator_carries_its_energy_to_the_ledger(rig: Rig) -> None:
    client = openai.OpenAI(base_url=rig.mesh.api, api_key=rig.mesh.key, max_retries=0,
                           timeout=60)
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6).choices
    reply = client.chat.completions.with_raw_response.create(
        model=GPU_MODEL, messages=HELLO, max_tokens=6)
    request_id = reply.headers.get("x-request-id")
    wait_until(lambda: sum(r.outcome == "ok" for r in rig.ledger()) == 2, 20, "the ledger rows")
    [on_cpu] = [r for r in rig.ledger() if r.model == MODEL]
    assert on_cpu.completion_tokens > 0
    assert on_cpu.joules is None  # a CPU with no readable meter: not measured, never 0
    assert on_cpu.energy_cost is None
    [row] = [r for r in rig.ledger() if r.model == GPU_MODEL]
    if request_id:
        assert row.request_id == request_id
    assert row.joules is not None
    assert 0 < row.joules < 71.3 * row.latency_ms / 1000 + 1  # at most the GPU's draw x time
    assert row.energy_estimated is False  # the counter, not power x time
    assert row.energy_cost == pytest.approx(row.joules / 3.6e6 * PRICE, rel=1e-6)
    scrape = httpx.get(f"http://127.0.0.1:{rig.mesh.api_port}/metrics").text
    [line] = [x for x in scrape.splitlines()
              if x.startswith(f'meshgate_energy_joules_total{{model="{GPU_MODEL}",route="node"}}')]
    assert float(line.split()[-1]) == pytest.approx(row.joules)


def test_requests_served_offline_reach_the_ledger_once_when_the_tunnel_is_back(
    rig: Rig,
) -> None:
    rig.cut()
    rig.serve_locally(MODEL, GPU_MODEL, MODEL)
    assert rig.journal_pending()
    assert rig.offline_rows() == []
    rig.proxy.heal()
    wait_until(lambda: len(rig.offline_rows()) >= 3 and not rig.journal_pending(), 90,
               "the journal uploaded", rig.procs())
    rows = rig.offline_rows()
    assert len(rows) == 3
    assert len({r.request_id for r in rows}) == 3
    did = rig.mesh.nodes_json()[0]["did"]
    assert sorted(r.model for r in rows) == [GPU_MODEL, MODEL, MODEL]
    for r in rows:
        assert (r.node_did, r.key_id, r.outcome) == (did, None, "ok")
        assert r.completion_tokens > 0
        if r.model == MODEL:
            assert r.joules is None  # on this box's CPU, which has no readable meter
        else:
            assert r.joules is not None
            assert r.joules > 0  # its share of the (fake) GPU's counter
            assert r.energy_cost == pytest.approx(r.joules / 3.6e6 * PRICE, rel=1e-6)


def test_a_node_killed_mid_upload_still_counts_each_row_once(rig: Rig) -> None:
    before = len(rig.offline_rows())
    rig.cut()
    rig.serve_locally(MODEL, GPU_MODEL)
    rig.mesh.nodes["node-a"].stop(signal.SIGKILL)
    rig.proxy.heal()
    rig.proxy.delay(2.0)  # every chunk 2 s late: the END of the upload too
    rig.start_node()
    wait_until(lambda: len(rig.offline_rows()) >= before + 2, 120, "the coordinator ingested",
               rig.procs())
    rig.mesh.nodes["node-a"].stop(signal.SIGKILL)  # before the END reached it
    assert rig.journal_pending(), "the kill came after the node confirmed: no window tested"
    rig.proxy.heal()
    rig.start_node()
    wait_until(lambda: not rig.journal_pending(), 120, "the journal sent again and confirmed",
               rig.procs())
    rows = rig.offline_rows()
    assert len(rows) == before + 2
    assert len({r.request_id for r in rows}) == len(rows)
    assert "(0 new, 2 already in the ledger)" in rig.mesh.nodes["node-a"].log_text()
