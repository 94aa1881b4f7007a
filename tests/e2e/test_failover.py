"""Faults mid-request, with real parts: a coordinator and two node processes serving the
real SmolLM2 model, each node's tunnel through a TCP fault proxy (`tests/faultproxy.py`),
and the `openai` client.

Each test pins two requests on node A while node B is down: `long`, a streaming
completion that has sent tokens, and `queued`, waiting in A's runner behind it (no token
yet). B comes up, then A fails (SIGKILL, tunnel cut, tunnel stall). What must happen:
`long` ends with an error event (never a silent truncation), `queued` is failed over to
B at once and answers in full, the ledger has one row per request naming the node and
the outcome, and nothing runs twice (each request id shows up once in B's log).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from coordinator.ledger_journal import JOURNAL_DIR
from coordinator.state import StateDir
from coordinator.store import Store, UsageRecord
from tests.e2e.mesh import Mesh, mesh_at, wait_until
from tests.faultproxy import ThreadedFaultProxy

pytestmark = pytest.mark.slow

MODEL = "smollm2"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
CONFIG = """
[dispatch]
first_token_timeout_s = 20
idle_timeout_s = 4
deadline_s = 120
"""


@dataclass
class Pair:
    mesh: Mesh
    model: Path
    proxies: dict[str, ThreadedFaultProxy] = field(default_factory=dict)

    def node_up(self, name: str) -> None:
        proc = self.mesh.nodes.get(name)
        if proc is None or proc.popen.poll() is not None:
            self.mesh.start_node(name, f"{MODEL}={self.model}")

    def node_down(self, name: str) -> None:
        proc = self.mesh.nodes.get(name)
        if proc is not None:
            proc.stop()

    def wait_nodes(self, count: int) -> None:
        procs = [p for p in [self.mesh.coordinator, *self.mesh.nodes.values()]
                 if p is not None and p.popen.poll() is None]
        wait_until(lambda: self.mesh.connected_nodes() == count, 90, f"{count} node(s)", procs)

    def ledger(self, request_id: str) -> list[UsageRecord]:
        store = Store(StateDir(self.mesh.coord_state).db_url)
        try:
            journal = self.mesh.coord_state / JOURNAL_DIR  # rows not committed yet too
            return [r for r in store.usage_rows_durable(journal) if r.request_id == request_id]
        finally:
            store.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Pair]:
    for mesh in mesh_at(tmp_path_factory.mktemp("failover")):
        config = mesh.root / "coordinator.toml"
        config.write_text(CONFIG)
        mesh.start_coordinator("--config", str(config))
        mesh.key = mesh.make_key("failover")
        pair = Pair(mesh, model_path)
        for name in ("node-a", "node-b"):
            proxy = ThreadedFaultProxy("127.0.0.1", mesh.tunnel_port)
            port = proxy.start()
            pair.proxies[name] = proxy
            token = mesh.token("--tunnel-url", f"ws://127.0.0.1:{port}")
            enrolled = mesh.enroll(name, token)
            assert enrolled.returncode == 0, enrolled.stderr
        try:
            yield pair
        finally:
            for proxy in pair.proxies.values():
                proxy.stop()
            mesh.stop()
            reap_runners(mesh.root)


def reap_runners(root: Path) -> None:
    """Kill llama.cpp runners a SIGKILLed node left behind (only those under `root`)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any("llama_worker" in part for part in cmdline) and any(
            str(root) in part for part in cmdline
        ):
            with contextlib.suppress(psutil.Error):
                proc.kill()


@dataclass
class Outcome:
    node: str = ""
    text: str = ""
    chunks: int = 0
    error: Exception | None = None
    finished: bool = False
    first: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


def stream(client: openai.OpenAI, request_id: str, max_tokens: int, out: Outcome) -> None:
    try:
        with client.completions.with_streaming_response.create(
            model=MODEL, prompt=COUNTING, max_tokens=max_tokens, temperature=0, stream=True,
            extra_headers={"x-request-id": request_id},
        ) as response:
            out.node = response.headers.get("x-meshgate-node", "")
            for chunk in response.parse():
                out.chunks += 1
                out.text += "".join(c.text for c in chunk.choices)
                out.first.set()
            out.finished = True
    except Exception as exc:  # the test inspects it
        out.error = exc
    finally:
        out.first.set()
        out.done.set()


def start(pair: Pair, request_id: str, max_tokens: int) -> Outcome:
    client = openai.OpenAI(base_url=pair.mesh.api, api_key=pair.mesh.key, max_retries=0,
                           timeout=180)
    out = Outcome()
    threading.Thread(target=stream, args=(client, request_id, max_tokens, out),
                     daemon=True).start()
    return out


def pin_two_requests_on_a(pair: Pair, tag: str) -> tuple[Outcome, Outcome, str, str]:
    """`long` streaming on node A, `queued` behind it in A's runner; then B comes up."""
    pair.node_down("node-b")
    pair.node_up("node-a")
    pair.wait_nodes(1)
    long_id, queued_id = f"req_{tag}_long", f"req_{tag}_queued"
    long = start(pair, long_id, 1500)
    assert long.first.wait(60), "no first chunk"
    assert long.error is None, long.error
    queued = start(pair, queued_id, 8)
    wait_until(lambda: queued_id in pair.mesh.nodes["node-a"].log_text(), 30,
               "queued request reached node A")
    pair.node_up("node-b")
    pair.wait_nodes(2)
    assert not long.done.is_set(), "the long request finished before the fault"
    assert not queued.first.is_set(), "the queued request started before the fault"
    return long, queued, long_id, queued_id


def check(pair: Pair, long: Outcome, queued: Outcome, long_id: str, queued_id: str,
          long_outcome: str) -> None:
    assert long.done.wait(60)
    assert queued.done.wait(120)
    # the started stream ends with an error event, not a silent truncation
    assert long.chunks > 0
    assert not long.finished
    assert isinstance(long.error, openai.APIError), long.error
    # the queued one was failed over to B and answered in full
    assert queued.error is None, queued.error
    assert queued.finished
    assert queued.text
    node_a, node_b = long.node, queued.node
    assert node_a
    assert node_b
    assert node_a != node_b
    # the ledger: exactly one row per request, with its node and outcome
    wait_until(lambda: bool(pair.ledger(long_id) and pair.ledger(queued_id)), 10,
               "ledger rows")
    (long_row,) = pair.ledger(long_id)
    (queued_row,) = pair.ledger(queued_id)
    assert (long_row.node_did, long_row.outcome) == (node_a, long_outcome)
    assert (queued_row.node_did, queued_row.outcome) == (node_b, "ok")
    assert queued_row.completion_tokens > 0
    # nothing ran twice: B saw the queued request once and never the long one
    b_log = pair.mesh.nodes["node-b"].log_text()
    assert b_log.count(f"request {queued_id}:") == 1
    assert long_id not in b_log


def test_sigkill_of_a_node_mid_request(pair: Pair) -> None:
    long, queued, long_id, queued_id = pin_two_requests_on_a(pair, "kill")
    started = time.monotonic()
    pair.mesh.nodes["node-a"].stop(signal.SIGKILL)
    check(pair, long, queued, long_id, queued_id, "node_lost_mid_stream")
    assert "disconnected mid-response" in str(long.error)
    print(f"\nSIGKILL: error event after {long.chunks} chunks; queued request failed over "
          f"and answered in {time.monotonic() - started:.1f} s")


def test_tunnel_cut_mid_request(pair: Pair) -> None:
    long, queued, long_id, queued_id = pin_two_requests_on_a(pair, "cut")
    started = time.monotonic()
    pair.proxies["node-a"].drop()
    check(pair, long, queued, long_id, queued_id, "node_lost_mid_stream")
    print(f"\ncut: error event after {long.chunks} chunks; queued request failed over "
          f"and answered in {time.monotonic() - started:.1f} s")


def test_tunnel_stall_mid_request(pair: Pair) -> None:
    long, queued, long_id, queued_id = pin_two_requests_on_a(pair, "stall")
    started = time.monotonic()
    pair.proxies["node-a"].stall()
    try:
        check(pair, long, queued, long_id, queued_id, "idle_timeout")
        assert "sent nothing for" in str(long.error)
    finally:
        pair.proxies["node-a"].heal()
    print(f"\nstall: error event after {long.chunks} chunks; queued request failed over "
          f"and answered in {time.monotonic() - started:.1f} s")


def test_a_model_loaded_nowhere_is_placed_on_demand(pair: Pair) -> None:
    """Not a fault: node A has the model in its inventory but unloaded; the coordinator
    commands it to load (COMMAND/RESULT over the tunnel) and the request waits for it."""
    pair.node_down("node-b")
    pair.node_up("node-a")
    pair.wait_nodes(1)
    admin = pair.mesh.proxy("node-a").removesuffix("/v1")
    unloaded = httpx.post(f"{admin}/meshgate/unload", json={"model": MODEL}, timeout=60)
    assert unloaded.status_code == 200, unloaded.text
    time.sleep(2)  # telemetry (every 0.5 s) tells the coordinator
    client = openai.OpenAI(base_url=pair.mesh.api, api_key=pair.mesh.key, max_retries=0,
                           timeout=120)
    reply = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=4)
    assert reply.choices[0].text
    coordinator = pair.mesh.coordinator
    assert coordinator is not None
    assert f"placing {MODEL} on" in coordinator.log_text()
    assert "'op': 'load'" in pair.mesh.nodes["node-a"].log_text()
