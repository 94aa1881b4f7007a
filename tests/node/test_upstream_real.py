"""`--upstream`: an OpenAI-compatible server already on the box, served through meshgate.

The server is a second real one on loopback: llama-cpp-python's own server with
the SmolLM2 file (as vLLM, llama-server or LM Studio would be). meshgate does
not load or unload it; it serves its model under the node's name, counts it in
the stats and metrics, and queues and answers errors the same way.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from node_agent.metrics import NodeMetrics
from node_agent.models import ModelManager
from tests.e2e.mesh import Proc, free_port, wait_until
from tests.node.proxy_thread import ProxyThread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

NAME = "box-llm"  # what apps on this node ask for
UPSTREAM_MODEL = "smol-upstream"  # what the server on the box calls it
HELLO: list[dict[str, str]] = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "server.log"
    popen = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve().parents[1] / "llama_server.py"),
            "--model",
            str(model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model_alias",
            UPSTREAM_MODEL,
            "--n_ctx",
            "1024",
            "--verbose",
            "false",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    proc = Proc(popen, log)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until(lambda: httpx.get(f"{url}/models").status_code == 200, 90, "server", [proc])
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, upstream: str) -> Iterator[ProxyThread]:
    manager = ModelManager(run_dir=tmp_path_factory.mktemp("node"))
    manager.add_upstream(NAME, upstream, upstream_model=UPSTREAM_MODEL)
    node = ProxyThread(manager, metrics=NodeMetrics(served=manager.names))
    node.start()
    yield node
    node.stop()


@pytest.fixture
def client(node: ProxyThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)


def test_the_upstream_model_is_listed_under_the_nodes_name(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [NAME]


def test_chat_through_meshgate_reaches_the_real_server(
    client: openai.OpenAI, node: ProxyThread
) -> None:
    served = node.manager.stats()[NAME]["served"]
    reply = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=8)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0
    assert node.manager.stats()[NAME]["served"] == served + 1
    assert node.manager.stats()[NAME]["kind"] == "upstream"


def test_streaming_chat_through_meshgate(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=NAME,
        messages=HELLO,
        max_tokens=8,
        stream=True,  # type: ignore[arg-type]
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.strip()


def test_completions_through_meshgate(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=4)
    assert reply.choices[0].text


def test_the_servers_own_errors_come_back_in_openais_shape(node: ProxyThread) -> None:
    reply = httpx.post(
        node.url + "/v1/chat/completions",
        # valid for OpenAI's schema (the node passes unknown fields on), not for this server
        json={"model": NAME, "messages": HELLO, "mirostat_mode": "hot"},
        timeout=60,
    )
    assert reply.status_code >= 400, reply.text  # llama-cpp-python's server says 500 here
    error = reply.json()["error"]
    assert "mirostat_mode" in error["message"]  # the server's own reason, passed on
    assert error["hop"] == "runner"  # and where it came from


def test_a_server_that_went_away_is_a_clear_503(tmp_path: Path) -> None:
    manager = ModelManager(run_dir=tmp_path)
    manager.add_upstream(NAME, f"http://127.0.0.1:{free_port()}/v1")  # nothing listens
    node = ProxyThread(manager)
    node.start()
    try:
        reply = httpx.post(
            node.url + "/v1/chat/completions", json={"model": NAME, "messages": HELLO}, timeout=30
        )
    finally:
        node.stop()
    assert reply.status_code == 503
    assert "unreachable" in reply.json()["error"]["message"]
