"""Ollama's API on the node proxy, driven by the official `ollama` client: the
real SmolLM2 model on our llama.cpp runner, and models of the fake Ollama
server through an OllamaRuntime, all behind one proxy on a loopback port."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from prometheus_client.parser import text_string_to_metric_families

from node_agent.models import ModelManager
from node_agent.ollama_ndjson import Translator
from node_agent.ollama_routes import OLLAMA_VERSION
from node_agent.ollama_wire import generate_request, openai_options
from node_agent.runtimes.ollama import OllamaHost
from tests.node.fake_ollama_server import CANNED, TOOL_ARGUMENTS, embedding, running
from tests.node.proxy_thread import NodeThread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SMOL = "smollm2"
HELLO: Any = [{"role": "user", "content": "Say hello."}]
GREEDY = {"temperature": 0, "num_predict": 8}
TEXT = "".join(w if i == 0 else " " + w for i, w in enumerate(CANNED))


# --- pure translation ---------------------------------------------------------------------


def test_ollama_options_and_format_become_openai_fields() -> None:
    body = {
        "options": {
            "temperature": 0.1,
            "num_predict": 5,
            "stop": "\n",
            "seed": 3,
            "num_ctx": 4096,
            "top_k": 20,
        },
        "format": "json",
    }
    assert openai_options(body) == {
        "temperature": 0.1,
        "max_tokens": 5,
        "stop": ["\n"],
        "seed": 3,
        "top_k": 20,
        "response_format": {"type": "json_object"},
    }
    assert openai_options({"options": {"num_predict": -1}}) == {}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert openai_options({"format": schema})["response_format"]["json_schema"]["schema"] == schema


def test_generate_is_a_chat_turn_unless_raw() -> None:
    endpoint, req = generate_request({"prompt": "Hi", "system": "Be nice."}, "m", stream=True)
    assert endpoint == "chat/completions"
    assert req["messages"] == [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hi"},
    ]
    assert req["stream_options"] == {"include_usage": True}
    endpoint, req = generate_request({"prompt": "Hi", "raw": True}, "m", stream=False)
    assert (endpoint, req) == ("completions", {"model": "m", "prompt": "Hi"})


def test_translator_turns_openai_chunks_into_ndjson_objects() -> None:
    t = Translator("m", chat=True)
    assert t.chunk(b'{"choices":[{"index":0,"delta":{"role":"assistant"}}]}') is None
    obj = t.chunk(b'{"choices":[{"index":0,"delta":{"content":"Hi"}}]}')
    assert obj is not None
    assert obj["message"] == {"role": "assistant", "content": "Hi"}
    assert obj["done"] is False
    t.chunk(b'{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}')
    t.chunk(b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}')
    last = t.final()
    assert last["done"] is True
    assert last["done_reason"] == "length"
    assert (last["prompt_eval_count"], last["eval_count"]) == (3, 1)
    assert last["total_duration"] >= last["eval_duration"] >= 0


# --- the proxy with the real model and the ollama client ----------------------------------


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[str, str]]:
    with (
        running("--model", "llama3.2:latest") as url,
        running("--model", "llama3.2:latest", "--fail-after", "2") as failing,
    ):
        yield url, failing


@pytest.fixture(scope="module")
def node(
    fakes: tuple[str, str], model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeThread]:
    url, failing = fakes

    async def setup(manager: ModelManager) -> Callable[[], Awaitable[None]]:
        manager.add_llama(SMOL, model_path, n_ctx=512)
        host, broken = OllamaHost(url), OllamaHost(failing)
        await host.sync(manager)
        manager.add_runtime(broken.runtime("broken", model="llama3.2:latest"))

        async def cleanup() -> None:
            await host.aclose()
            await broken.aclose()

        return cleanup

    with NodeThread(tmp_path_factory.mktemp("node"), setup) as node:
        yield node


@pytest.fixture
def client(node: NodeThread) -> ollama.Client:
    return ollama.Client(host=node.url)


def test_chat_with_the_real_model_stream_and_not(client: ollama.Client) -> None:
    reply = client.chat(model=SMOL, messages=HELLO, options=GREEDY)
    assert reply.done is True
    assert reply.model == SMOL
    assert reply.message.role == "assistant"
    assert reply.message.content
    assert reply.done_reason in ("stop", "length")
    assert reply.prompt_eval_count
    assert reply.eval_count is not None
    assert 0 < reply.eval_count <= 8
    parts = list(client.chat(model=SMOL, messages=HELLO, options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content or "" for p in parts) == reply.message.content
    last = parts[-1]
    assert (last.done_reason, last.eval_count, last.prompt_eval_count) == (
        reply.done_reason,
        reply.eval_count,
        reply.prompt_eval_count,
    )
    assert last.total_duration is not None
    assert last.eval_duration is not None
    assert last.total_duration >= last.eval_duration > 0


def test_generate_with_the_real_model_stream_and_not(client: ollama.Client) -> None:
    reply = client.generate(
        model=SMOL,
        prompt="The capital of France is",
        raw=True,
        options={"temperature": 0, "num_predict": 6},
    )
    assert reply.response
    assert reply.done_reason == "length"
    assert reply.eval_count == 6
    parts = list(
        client.generate(
            model=SMOL,
            prompt="The capital of France is",
            raw=True,
            options={"temperature": 0, "num_predict": 6},
            stream=True,
        )
    )
    assert "".join(p.response or "" for p in parts) == reply.response
    assert parts[-1].done is True
    assert parts[-1].eval_count == 6
    chat_turn = client.generate(model=SMOL, prompt="Say hello.", system="Be brief.", options=GREEDY)
    assert chat_turn.response
    assert chat_turn.done is True


def test_tags_version_ps_and_show_describe_what_is_served(
    client: ollama.Client,
    node: NodeThread,
) -> None:
    tags = {m.model: m for m in client.list().models}
    assert set(tags) == {SMOL, "llama3.2:latest", "broken"}
    smol = tags[SMOL]
    assert smol.details is not None
    assert smol.details.family == "llama"
    assert smol.details.quantization_level == "Q4_1"
    assert smol.size
    assert tags["llama3.2:latest"].digest  # from the fake Ollama's own list
    assert httpx.get(f"{node.url}/api/version").json() == {"version": OLLAMA_VERSION}
    assert httpx.get(f"{node.url}/").text == "Ollama is running"
    loaded = {m.model: m for m in client.ps().models}
    assert SMOL in loaded
    assert loaded[SMOL].expires_at is not None
    assert loaded[SMOL].context_length == 512
    shown = client.show(SMOL)
    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.capabilities == ["completion"]


def test_ollama_models_behind_the_proxy_answer_and_load_and_unload(
    client: ollama.Client,
    fakes: tuple[str, str],
) -> None:
    fake = ollama.Client(host=fakes[0])
    reply = client.chat(model="llama3.2", messages=HELLO)  # ":latest" is implied, as in Ollama
    assert reply.message.content == TEXT
    assert reply.eval_count == len(CANNED)
    assert "llama3.2:latest" in {m.model for m in fake.ps().models}
    gone = client.generate(model="llama3.2", keep_alive=0)
    assert gone.done_reason == "unload"
    assert "llama3.2:latest" not in {m.model for m in fake.ps().models}
    back = client.chat(model="llama3.2:latest", keep_alive="10m")
    assert back.done_reason == "load"
    assert "llama3.2:latest" in {m.model for m in fake.ps().models}
    loaded = client.chat(model=SMOL)
    assert loaded.done_reason == "load"


def test_unknown_models_are_ollamas_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="no-such-model", messages=HELLO)
    assert caught.value.status_code == 404
    assert "no-such-model" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        list(client.generate(model="no-such-model", prompt="x", stream=True))
    assert caught.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("no-such-model")
    assert caught.value.status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"messages": []}',
        b'{"model": "smollm2", "messages": "hi"}',
        b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "stream": "no"}',
        b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}],'
        b' "options": {"num_predict": "many"}}',
    ],
)
def test_bad_requests_are_a_400_in_ollamas_shape(node: NodeThread, body: bytes) -> None:
    reply = httpx.post(f"{node.url}/api/chat", content=body)
    assert reply.status_code == 400, reply.text
    assert isinstance(reply.json()["error"], str)


def test_an_error_mid_stream_is_a_last_error_line_the_client_raises(
    client: ollama.Client,
    node: NodeThread,
) -> None:
    got: list[str] = []

    def drain() -> None:
        for part in client.chat(model="broken", messages=HELLO, stream=True):
            got.append(part.message.content or "")

    with pytest.raises(ollama.ResponseError) as caught:
        drain()
    assert "fake failure mid-stream" in caught.value.error
    assert "".join(got) == "The quick"
    lines = httpx.post(
        f"{node.url}/api/generate", json={"model": "broken", "prompt": "x"}
    ).text.splitlines()
    assert lines[-1].startswith('{"error":')


def requests_counted(node: NodeThread, model: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(node.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "meshgate_node_requests_total" and sample.labels["model"] == model:
                total += sample.value
    return total


def test_ollama_api_requests_count_in_the_node_metrics(
    client: ollama.Client, node: NodeThread
) -> None:
    before = requests_counted(node, "llama3.2:latest")
    client.chat(model="llama3.2", messages=HELLO)
    list(client.generate(model="llama3.2", prompt="x", stream=True))
    assert requests_counted(node, "llama3.2:latest") == before + 2


def test_streamed_tool_call_fragments_are_sent_whole() -> None:
    t = Translator("m", chat=True)
    for piece in (
        '{"index":0,"id":"c1","type":"function","function":{"name":"f","arguments":""}}',
        '{"index":0,"function":{"arguments":"{\\"a\\": "}}',
        '{"index":0,"function":{"arguments":"1}"}}',
    ):
        assert (
            t.chunk(b'{"choices":[{"index":0,"delta":{"tool_calls":[' + piece.encode() + b"]}}]}")
            is None
        )
    calls = t.tool_calls()
    assert calls is not None
    assert calls["message"]["tool_calls"] == [{"function": {"name": "f", "arguments": {"a": 1}}}]


def test_tool_calls_reach_ollama_apps_through_any_runtime(client: ollama.Client) -> None:
    tools: Any = [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    reply = client.chat(model="llama3.2", messages=HELLO, tools=tools)
    assert reply.message.tool_calls is not None
    assert reply.message.tool_calls[0].function.name == "get_weather"
    assert reply.message.tool_calls[0].function.arguments == TOOL_ARGUMENTS
    parts = list(client.chat(model="llama3.2", messages=HELLO, tools=tools, stream=True))
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_weather", TOOL_ARGUMENTS)
    ]
    assert parts[-1].done is True


def test_model_management_is_refused_clearly_and_names_work_with_latest(
    client: ollama.Client, node: NodeThread
) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.pull("llama3.2")
    assert caught.value.status_code == 501
    assert "not supported" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.delete(SMOL)
    assert caught.value.status_code == 501
    missing = httpx.get(f"{node.url}/api/nothing")
    assert missing.status_code == 404
    assert isinstance(missing.json()["error"], str)
    reply = client.chat(model=f"{SMOL}:latest", messages=HELLO, options={"num_predict": 2})
    assert reply.model == f"{SMOL}:latest"
    assert reply.eval_count in (1, 2)


def test_embeddings_through_the_ollama_api(client: ollama.Client) -> None:
    vectors = client.embed(model="llama3.2", input=["a b", "c"])
    got = [list(v) for v in vectors.embeddings]
    assert got == [
        pytest.approx(embedding("a b", 8), abs=1e-6),
        pytest.approx(embedding("c", 8), abs=1e-6),
    ]
    assert vectors.prompt_eval_count == 3
    legacy = client.embeddings(model="llama3.2", prompt="c")
    assert legacy.embedding == pytest.approx(embedding("c", 8), abs=1e-6)
    smol = client.embed(model=SMOL, input=["x", "y z"])  # the llama.cpp runner embeds too
    assert len(smol.embeddings) == 2
    assert all(len(v) > 0 for v in smol.embeddings)
    assert (smol.prompt_eval_count or 0) > 0
