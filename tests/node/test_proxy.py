"""The node's local proxy with real parts: uvicorn on a loopback port, the
model manager running our llama.cpp worker with SmolLM2, and the official
`openai` client (plus raw httpx for what the client will not send)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from node_agent.models import ModelManager
from node_agent.runtimes.llama.supervisor import LlamaRunner
from tests.node.proxy_thread import ProxyThread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MODEL = "smollm2"
HELLO = [{"role": "user", "content": "Say hello."}]


class Node(ProxyThread):
    """One real SmolLM2 runner behind the proxy, on their own event loop thread."""

    def __init__(self, run_dir: Path, model_path: Path) -> None:
        manager = ModelManager(run_dir=run_dir)
        self.runner: LlamaRunner = manager.add_llama(MODEL, model_path, n_ctx=512)
        super().__init__(manager, telemetry=lambda: {"cpu": {"count": 2}})

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.manager.stats()[MODEL]
        return stats


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Node]:
    node = Node(tmp_path_factory.mktemp("node"), model_path)
    node.start()
    yield node
    node.stop()


@pytest.fixture
def client(node: Node) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0)


def worker_health(node: Node) -> dict[str, Any]:
    transport = httpx.HTTPTransport(uds=str(node.runner.socket))
    with httpx.Client(transport=transport) as c:
        data: dict[str, Any] = c.get("http://runner/health").json()
    return data


def wait_restarted(node: Node, crashes: int) -> None:
    deadline = time.monotonic() + 60
    while node.stats()["crashes"] < crashes or node.runner.state != "up":
        assert time.monotonic() < deadline, "the runner did not come back"
        time.sleep(0.05)


def test_chat_answers_with_text_and_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8)
    assert reply.model == MODEL
    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 8


def test_streaming_chat_ends_with_one_usage_chunk_that_counts_the_tokens(
    client: openai.OpenAI, node: Node,
) -> None:
    unasked = list(client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=10, stream=True, temperature=0,
    ))
    assert all(c.choices and c.usage is None for c in unasked)  # the docs' plain loop works
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=10, stream=True, temperature=0,
        stream_options={"include_usage": True},
    ))
    pieces = [c.choices[0].delta.content for c in chunks
              if c.choices and c.choices[0].delta.content]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1
    assert chunks[-1].usage == usage[0]
    assert usage[0].completion_tokens == len(pieces)
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10,
                                           temperature=0)
    assert plain.usage == usage[0]
    assert plain.choices[0].message.content == "".join(pieces)
    assert node.stats()["in_flight"] == 0


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="The capital of France is",
                                      max_tokens=6, temperature=0)
    assert reply.choices[0].text
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is",
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text
    assert chunks[-1].usage == reply.usage


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_unknown_model_is_a_404_in_openais_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert "no-such-model" in str(caught.value)
    assert caught.value.code == "model_not_found"


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"model": "smollm2"}',
                                  b'{"model": "smollm2", "messages": [], "stream": "yes"}'])
def test_malformed_body_is_a_400(node: Node, body: bytes) -> None:
    reply = httpx.post(f"{node.url}/v1/chat/completions", content=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert reply.json()["error"]["hop"] == "node"


def test_oversize_body_is_a_413_with_or_without_a_length(node: Node) -> None:
    big = b'{"model": "smollm2", "messages": [], "pad": "' + b"x" * (5 << 20) + b'"}'
    assert httpx.post(f"{node.url}/v1/chat/completions", content=big).status_code == 413

    def chunked() -> Iterator[bytes]:
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]

    reply = httpx.post(f"{node.url}/v1/chat/completions", content=chunked())
    assert reply.status_code == 413
    assert "limit" in reply.json()["error"]["message"]


def test_telemetry_health_and_unknown_paths(node: Node) -> None:
    assert httpx.get(f"{node.url}/meshgate/telemetry").json() == {"cpu": {"count": 2}}
    assert httpx.get(f"{node.url}/healthz").json() == {"status": "ok", "models": [MODEL]}
    missing = httpx.get(f"{node.url}/v1/nothing")
    assert missing.status_code == 404
    assert "error" in missing.json()


def test_a_client_leaving_mid_stream_stops_generation(node: Node) -> None:
    before = worker_health(node)["cancelled"]
    body = {"model": MODEL, "prompt": "Count from 1 to 100: 1, 2, 3,", "max_tokens": 400,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{node.url}/v1/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 5
    while worker_health(node)["cancelled"] == before:
        assert time.monotonic() < deadline, "the worker kept generating"
        time.sleep(0.05)
    assert node.stats()["in_flight"] == 0


def test_a_killed_runner_is_a_clear_503_then_recovers(node: Node, client: openai.OpenAI) -> None:
    crashes = node.stats()["crashes"]
    assert node.runner.pid is not None
    os.kill(node.runner.pid, signal.SIGKILL)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    assert caught.value.status_code == 503
    assert MODEL in str(caught.value)
    wait_restarted(node, crashes + 1)
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    assert reply.choices[0].message.content


def test_an_error_after_the_stream_started_ends_it_with_an_error_event(node: Node) -> None:
    body = {"model": MODEL, "prompt": "Count from 1 to 100: 1, 2, 3,", "max_tokens": 200,
            "temperature": 0, "stream": True}
    events: list[str] = []
    crashes = node.stats()["crashes"]
    with httpx.stream("POST", f"{node.url}/v1/completions", json=body, timeout=60) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2 and node.runner.pid is not None:
                    os.kill(node.runner.pid, signal.SIGKILL)
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["message"]
    wait_restarted(node, crashes + 1)
