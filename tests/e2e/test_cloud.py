"""Cloud fallback end to end: the "cloud" is a second real OpenAI-compatible server on
loopback (llama-cpp-python's own server with the same SmolLM2 file, behind an API key),
configured as an `[[upstream]]` in coordinator.toml; a real node serves `smollm2` through
a fault proxy so that its attempts can be made to fail."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from coordinator.ledger_journal import JOURNAL_DIR
from coordinator.state import StateDir
from coordinator.store import Store, UsageRecord
from tests.e2e.mesh import Mesh, Proc, free_port, mesh_at, wait_until
from tests.faultproxy import ThreadedFaultProxy

pytestmark = pytest.mark.slow

MODEL = "smollm2"
CLOUD_ONLY = "cloud-only"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]
KEY_ENV = "MG_TEST_CLOUD_KEY"


@dataclass
class Cloudy:
    mesh: Mesh
    cloud: Proc
    cloud_url: str
    secret: str
    proxy: ThreadedFaultProxy

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.mesh.api, api_key=self.mesh.key, max_retries=0,
                             timeout=120)

    def ledger(self, request_id: str) -> list[UsageRecord]:
        store = Store(StateDir(self.mesh.coord_state).db_url)
        try:
            journal = self.mesh.coord_state / JOURNAL_DIR  # rows not committed yet too
            return [r for r in store.usage_rows_durable(journal) if r.request_id == request_id]
        finally:
            store.close()

    def one_row(self, request_id: str) -> UsageRecord:
        wait_until(lambda: bool(self.ledger(request_id)), 10, f"ledger row of {request_id}")
        (row,) = self.ledger(request_id)
        return row


def start_cloud(root: Path, model: Path, secret: str) -> tuple[Proc, str]:
    port = free_port()
    log = root / "cloud.log"
    popen = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "llama_server.py"),
         "--model", str(model), "--port", str(port),
         "--host", "127.0.0.1", "--api_key", secret, "--model_alias", "cloud-small",
         "--n_ctx", "2048", "--verbose", "false"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    proc = Proc(popen, log)
    url = f"http://127.0.0.1:{port}/v1"
    wait_until(lambda: httpx.get(f"{url}/models", headers={
        "Authorization": f"Bearer {secret}"}).status_code == 200, 90, "cloud server", [proc])
    return proc, url


@pytest.fixture(scope="module")
def cloudy(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Cloudy]:
    secret = "sk-test-" + secrets.token_hex(16)
    for mesh in mesh_at(tmp_path_factory.mktemp("cloud")):
        cloud, url = start_cloud(mesh.root, model_path, secret)
        try:
            config = mesh.root / "coordinator.toml"
            config.write_text(f"""
[dispatch]
first_token_timeout_s = 3

[[upstream]]
name = "loopcloud"
base_url = "{url}"
api_key_env = "{KEY_ENV}"
models = {{ {MODEL} = "cloud-small", {CLOUD_ONLY} = "cloud-small" }}
price_per_1k_prompt = 0.5
price_per_1k_completion = 1.5
""")
            mesh.start_coordinator("--config", str(config), env={KEY_ENV: secret})
            mesh.key = mesh.make_key("cloud")
            proxy = ThreadedFaultProxy("127.0.0.1", mesh.tunnel_port)
            port = proxy.start()
            enrolled = mesh.enroll("node-a", mesh.token("--tunnel-url", f"ws://127.0.0.1:{port}"))
            assert enrolled.returncode == 0, enrolled.stderr
            mesh.start_node("node-a", f"{MODEL}={model_path}")
            mesh.wait_serving(MODEL)
            # the runner's first answer (llama.cpp's first graph) can take longer than the 3 s
            # first-token timeout on a loaded box: warm it on the node's own port, which the
            # coordinator's timeout does not cover, so routing tests see a warm node
            warm = httpx.post(f"{mesh.proxy('node-a')}/chat/completions", timeout=120,
                              json={"model": MODEL, "messages": HELLO, "max_tokens": 1})
            assert warm.status_code == 200, warm.text
            yield Cloudy(mesh, cloud, url, secret, proxy)
            proxy.stop()
        finally:
            cloud.stop()


def test_a_model_no_node_serves_goes_to_the_cloud(cloudy: Cloudy) -> None:
    raw = cloudy.client().chat.completions.with_raw_response.create(
        model=CLOUD_ONLY, messages=HELLO, max_tokens=8,
        extra_headers={"x-request-id": "req_cloud_plain"},
    )
    assert raw.headers["x-meshgate-upstream"] == "loopcloud"
    reply = raw.parse()
    assert reply.choices[0].message.content
    assert reply.usage is not None
    row = cloudy.one_row("req_cloud_plain")
    assert (row.upstream, row.node_did, row.outcome) == ("loopcloud", None, "ok")
    assert row.model == CLOUD_ONLY
    assert row.prompt_tokens == reply.usage.prompt_tokens
    assert row.completion_tokens == reply.usage.completion_tokens
    expected = (reply.usage.prompt_tokens * 0.5 + reply.usage.completion_tokens * 1.5) / 1000
    assert row.cost == pytest.approx(expected)


def test_cloud_streaming_passes_through_with_usage_and_cost(cloudy: Cloudy) -> None:
    with cloudy.client().chat.completions.with_streaming_response.create(
        model=CLOUD_ONLY, messages=HELLO, max_tokens=12, stream=True,
        extra_headers={"x-request-id": "req_cloud_stream"},
    ) as response:
        assert response.headers["x-meshgate-upstream"] == "loopcloud"
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2
    assert text
    row = cloudy.one_row("req_cloud_stream")
    assert (row.upstream, row.outcome) == ("loopcloud", "ok")
    assert 0 < row.completion_tokens <= 12
    assert row.cost > 0


def test_a_served_model_stays_on_the_node(cloudy: Cloudy) -> None:
    raw = cloudy.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=6,
        extra_headers={"x-request-id": "req_edge"},
    )
    assert raw.headers.get("x-meshgate-node", "").startswith("did:key:")
    assert "x-meshgate-upstream" not in raw.headers
    row = cloudy.one_row("req_edge")
    assert row.upstream is None
    assert row.cost == 0


def test_when_every_node_attempt_fails_the_cloud_answers(cloudy: Cloudy) -> None:
    cloudy.proxy.stall()  # the node's tunnel goes silent: no first token within 3 s
    try:
        raw = cloudy.client().chat.completions.with_raw_response.create(
            model=MODEL, messages=HELLO, max_tokens=6,
            extra_headers={"x-request-id": "req_fallback"},
        )
    finally:
        cloudy.proxy.heal()
    assert raw.headers["x-meshgate-upstream"] == "loopcloud"
    assert raw.parse().choices[0].message.content
    row = cloudy.one_row("req_fallback")
    assert (row.upstream, row.outcome) == ("loopcloud", "ok")
    assert "no first token" in cloudy.mesh.coordinator.log_text()  # type: ignore[union-attr]


def test_the_upstream_key_never_leaks(cloudy: Cloudy) -> None:
    body = httpx.post(f"{cloudy.mesh.api}/chat/completions", json={
        "model": CLOUD_ONLY, "messages": HELLO, "max_tokens": 4, "stream": True},
        headers={"Authorization": f"Bearer {cloudy.mesh.key}"}, timeout=60)
    assert body.status_code == 200
    seen = body.text + str(body.headers)
    coordinator = cloudy.mesh.coordinator
    assert coordinator is not None
    logs = coordinator.log_text() + "".join(p.log_text() for p in cloudy.mesh.nodes.values())
    assert "loopcloud" in logs  # the logs are there and name the upstream...
    assert cloudy.secret not in logs  # ...but never its key
    assert cloudy.secret not in seen
    assert cloudy.secret[8:] not in logs + seen


def test_models_lists_cloud_models_too(cloudy: Cloudy) -> None:
    names = [m.id for m in cloudy.client().models.list()]
    assert CLOUD_ONLY in names
    assert MODEL in names


def test_a_dead_upstream_is_a_503_that_says_why(cloudy: Cloudy) -> None:
    """Last: stops the cloud."""
    cloudy.cloud.stop()
    with pytest.raises(openai.APIStatusError) as caught:
        cloudy.client().chat.completions.create(model=CLOUD_ONLY, messages=HELLO, max_tokens=4)
    assert caught.value.status_code == 503
    assert "cloud loopcloud" in str(caught.value)
    assert "cannot reach upstream" in str(caught.value)
    assert cloudy.secret not in str(caught.value)
