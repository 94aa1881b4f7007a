"""One contract, every runtime: what the pipeline may rely on, whatever serves the model.

Run against each runtime behind :class:`node_agent.runtimes.base.Runtime`:

- ``fake``: the named :class:`FakeRuntime`;
- ``upstream``: :class:`OpenAIHttpRuntime` against the FAKE OpenAI server (a real process);
- ``ollama``: :class:`OllamaRuntime` against the FAKE Ollama server (a real process);
- ``llama``: our llama.cpp runner with the real SmolLM2 under the supervisor;
- ``mesh``: :class:`MeshRuntime` over a real tunnel pair, the far side answering through
  the link's own request path (a pipeline over a fake runtime).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from meshgate.openai import OpenAIError
from node_agent.link import answer
from node_agent.models import ModelManager
from node_agent.pipeline import Pipeline
from node_agent.placement import Budget
from node_agent.runtimes.base import FakeRuntime, Runtime
from node_agent.runtimes.llama.supervisor import LlamaRunner
from node_agent.runtimes.mesh import MeshRuntime
from node_agent.runtimes.ollama import OllamaRuntime
from node_agent.runtimes.openai_http import OpenAIHttpRuntime
from tests.node.fake_ollama_server import free_port, running
from tests.tunnel.mux_pair import Pair, mux_pair
from tunnel import Frame, Stream, until_cancelled

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

FAKE_OPENAI = str(Path(__file__).with_name("fake_openai_server.py"))
KINDS = ["fake", "upstream", "ollama", "llama", "mesh"]
HELLO = [{"role": "user", "content": "Say hello to me."}]


@dataclass
class Case:
    kind: str
    runtime: Runtime
    model: str

    def chat(self, **extra: Any) -> bytes:
        body = {"model": self.model, "messages": HELLO, "max_tokens": 8, "temperature": 0}
        return json.dumps({**body, **extra}).encode()


@pytest.fixture(scope="module")
def openai_server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, FAKE_OPENAI, "--port", str(port), "--chunks", "6"])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    try:
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, "the fake OpenAI server exited"
                assert time.monotonic() < deadline, "the fake OpenAI server did not start"
                time.sleep(0.05)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def ollama_server() -> Iterator[str]:
    models = ("--model", "llama3.2:latest", "--model", "nomic-embed-text:latest=embedding")
    with running(*models) as url:
        yield url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def llama(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LlamaRunner]:
    runner = LlamaRunner(
        "smollm2", model_path, run_dir=tmp_path_factory.mktemp("run"), n_ctx=512,
        ready_timeout=60,
    )
    await runner.start()
    yield runner
    await runner.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def far() -> AsyncIterator[tuple[Pair, FakeRuntime]]:
    """A tunnel pair whose far end answers like a node's link, from a fake runtime."""
    fake = FakeRuntime("far-model", chunks=6)
    manager = ModelManager(run_dir=Path("/nonexistent"), budget=Budget(1 << 30, 0))
    manager.add_runtime(fake)
    pipeline = Pipeline(manager)

    async def serve(stream: Stream, frame: Frame) -> None:
        await until_cancelled(stream, answer(pipeline, stream, frame))

    pair = await mux_pair(coord_on_stream=serve)
    yield pair, fake
    await pair.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def upstream(openai_server: str) -> AsyncIterator[OpenAIHttpRuntime]:
    runtime = OpenAIHttpRuntime("m", "upstream", openai_server, upstream_model="gpt-up")
    yield runtime
    await runtime.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ollama(ollama_server: str) -> AsyncIterator[OllamaRuntime]:
    runtime = OllamaRuntime("llama3.2:latest", ollama_server)
    yield runtime
    await runtime.aclose()


@pytest.fixture(params=KINDS)
def case(request: pytest.FixtureRequest) -> Case:
    kind: str = request.param
    if kind == "fake":
        return Case(kind, FakeRuntime("m", chunks=6), "m")
    if kind == "upstream":
        return Case(kind, request.getfixturevalue("upstream"), "m")
    if kind == "ollama":
        return Case(kind, request.getfixturevalue("ollama"), "llama3.2:latest")
    if kind == "llama":
        runner: LlamaRunner = request.getfixturevalue("llama")
        return Case(kind, runner.runtime, "smollm2")
    pair, _ = request.getfixturevalue("far")
    return Case(kind, MeshRuntime("far-model", lambda: pair.node_mux), "far-model")


async def test_health_says_it_answers(case: Case) -> None:
    assert await case.runtime.health() is True
    assert case.runtime.name
    assert case.runtime.kind


async def test_complete_answers_in_openais_shape_with_usage(case: Case) -> None:
    data, usage = await case.runtime.complete("chat/completions", case.chat())
    reply = json.loads(data)
    assert reply["object"] == "chat.completion"
    assert isinstance(reply["choices"][0]["message"]["content"], str)
    assert usage is not None
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0
    assert reply["usage"]["completion_tokens"] == usage["completion_tokens"]


async def test_stream_yields_chunks_then_one_usage_chunk(case: Case) -> None:
    chunks = [json.loads(c) async for c in case.runtime.stream(
        "chat/completions", case.chat(stream=True)
    )]
    text = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    )
    assert text.strip()
    usage_chunks = [c for c in chunks if c.get("usage")]
    assert len(usage_chunks) == 1
    assert usage_chunks[0]["choices"] == []
    assert usage_chunks[0]["usage"]["completion_tokens"] > 0
    assert chunks[-1] is usage_chunks[0]


async def test_embed_answers_vectors_with_usage(case: Case) -> None:
    model = "nomic-embed-text:latest" if case.kind == "ollama" else case.model
    runtime: Runtime = case.runtime
    if case.kind == "ollama":
        assert isinstance(case.runtime, OllamaRuntime)
        runtime = OllamaRuntime(model, case.runtime.host)
    body = json.dumps({"model": model, "input": ["one", "two words"]}).encode()
    try:
        data, usage = await runtime.embed(body)
    except OpenAIError as exc:
        if case.kind == "llama" and "embeddings" in exc.message:
            pytest.skip(f"this llama.cpp runner has no embeddings: {exc.message}")
        raise
    reply = json.loads(data)
    assert [d["index"] for d in reply["data"]] == [0, 1]
    assert all(len(d["embedding"]) > 0 for d in reply["data"])
    assert usage is not None
    assert usage["prompt_tokens"] > 0


async def test_a_bad_request_is_an_openai_error_with_a_4xx(case: Case) -> None:
    with pytest.raises(OpenAIError) as caught:
        await case.runtime.complete("chat/completions", b"{not json")
    assert 400 <= caught.value.status < 500
    with pytest.raises(OpenAIError) as streamed:
        async for _ in case.runtime.stream("chat/completions", b"{not json"):
            pass
    assert 400 <= streamed.value.status < 500


async def test_closing_a_stream_early_leaves_the_runtime_serving(case: Case) -> None:
    chunks = case.runtime.stream("chat/completions", case.chat(stream=True, max_tokens=64))
    first = await anext(chunks)
    assert json.loads(first)["object"] == "chat.completion.chunk"
    await asyncio.wait_for(chunks.aclose(), 10)  # type: ignore[attr-defined]
    if isinstance(case.runtime, FakeRuntime):
        assert case.runtime.cancelled == 1
    data, usage = await asyncio.wait_for(
        case.runtime.complete("chat/completions", case.chat()), 60
    )
    assert usage is not None
    assert json.loads(data)["choices"]


async def test_unload_then_load_serves_again_or_refuses_clearly(case: Case) -> None:
    refused: OpenAIError | None = None
    try:
        await case.runtime.unload()
    except OpenAIError as exc:  # a runtime that holds nothing here says so
        refused = exc
    if refused is not None:
        assert refused.status == 400
        assert "nothing to unload" in refused.message
    assert case.kind in ("upstream", "mesh") or refused is None
    await case.runtime.load()
    assert await case.runtime.health() is True
    data, usage = await case.runtime.complete("chat/completions", case.chat())
    assert usage is not None
    assert json.loads(data)["choices"]
