"""OllamaRuntime with real parts: the official `ollama` client against the fake Ollama
server (its own process, Ollama's wire protocol). The node proxy in front of it with the
official `openai` client is tests/node/test_ollama_proxy.py."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest

from meshgate.openai import OpenAIError
from node_agent.models import ModelManager
from node_agent.ollama_wire import options_of
from node_agent.runtimes.base import Body
from node_agent.runtimes.ollama import OllamaHost, OllamaRuntime, merge_models
from tests.node.fake_ollama_server import CANNED, embedding, free_port, running
from tests.node.ollama_harness import (
    HELLO,
    TEXT,
    body,
    recorded,
    run_fake,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    yield from run_fake()


@pytest.fixture(scope="module")
def failing() -> Iterator[str]:
    with running("--model", "llama3.2:latest", "--fail-after", "2") as url:
        yield url


@pytest.fixture
async def host(fake: str) -> AsyncIterator[OllamaHost]:
    host = OllamaHost(fake)
    yield host
    await host.aclose()


# --- pure translation ---------------------------------------------------------------------


def test_options_translate_openai_sampling_fields_to_ollamas() -> None:
    assert options_of(
        {
            "temperature": 0.2,
            "top_p": 0.9,
            "max_tokens": 7,
            "stop": "x",
            "seed": 42,
            "top_k": 5,
            "user": "ignored",
        }
    ) == {"temperature": 0.2, "top_p": 0.9, "num_predict": 7, "stop": ["x"], "seed": 42, "top_k": 5}
    assert options_of({"max_completion_tokens": 3, "max_tokens": 9}) == {"num_predict": 3}
    for bad in ({"max_tokens": "ten"}, {"stop": [1]}, {"n": 2}):
        with pytest.raises(OpenAIError) as caught:
            options_of(bad)
        assert caught.value.status == 400


def test_merging_list_and_ps_marks_loaded_models() -> None:
    listed = ollama.ListResponse.model_validate(
        {
            "models": [
                {
                    "model": "b:latest",
                    "size": 10,
                    "digest": "d1",
                    "details": {
                        "family": "llama",
                        "parameter_size": "1B",
                        "quantization_level": "Q4_0",
                    },
                },
                {"model": "a:latest", "size": 20},
            ]
        }
    )
    running_ = ollama.ProcessResponse.model_validate(
        {
            "models": [
                {
                    "model": "b:latest",
                    "name": "b:latest",
                    "size_vram": 5,
                    "expires_at": "2030-01-01T00:00:00Z",
                    "context_length": 4096,
                },
                {"model": "cloud:latest", "name": "cloud:latest", "size": 1},
            ]
        }
    )
    models = merge_models(listed, running_)
    assert [m.name for m in models] == ["a:latest", "b:latest", "cloud:latest"]
    a, b, cloud = models
    assert not a.loaded
    assert a.size_bytes == 20
    assert b.loaded
    assert b.size_vram == 5
    assert b.context_length == 4096
    assert b.expires_at is not None
    assert b.expires_at.startswith("2030-01-01")
    assert b.family == "llama"
    assert b.quantization == "Q4_0"
    assert cloud.loaded
    assert cloud.source == "ollama"


# --- the runtime against the fake server --------------------------------------------------


async def test_discovery_load_and_unload_follow_ollamas_list_and_ps(host: OllamaHost) -> None:
    models = {m.name: m for m in await host.discover()}
    assert set(models) == {"llama3.2:latest", "smol:latest", "nomic-embed-text:latest"}
    runtime = host.runtime("smol:latest")
    await runtime.unload()
    assert not {m.name: m for m in await host.discover()}["smol:latest"].loaded
    await runtime.load("10m")
    smol = {m.name: m for m in await host.discover()}["smol:latest"]
    assert smol.loaded
    assert smol.size_vram
    assert smol.expires_at
    assert smol.to_dict()["source"] == "ollama"
    await runtime.unload()
    assert not {m.name: m for m in await host.discover()}["smol:latest"].loaded
    assert await runtime.health()
    assert not await host.runtime("not-there:latest").health()


async def test_chat_answers_in_openais_shape_with_usage_from_eval_counts(
    host: OllamaHost,
    fake: str,
) -> None:
    runtime = host.runtime("llama3.2:latest")
    raw, usage = await runtime.complete("chat/completions", body(messages=HELLO))
    reply = json.loads(raw)
    assert reply["object"] == "chat.completion"
    assert reply["model"] == "llama3.2:latest"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": TEXT}
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert (
        usage
        == reply["usage"]
        == {"prompt_tokens": 4, "completion_tokens": len(CANNED), "total_tokens": 4 + len(CANNED)}
    )
    sent = recorded(fake, "/api/chat")
    assert sent["messages"] == HELLO
    assert sent["stream"] is False


async def test_a_body_the_front_door_decoded_is_not_decoded_again(
    host: OllamaHost, fake: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime = host.runtime("llama3.2:latest")
    data = {"model": "llama3.2:latest", "messages": HELLO}
    decodes: list[object] = []
    real = json.loads
    monkeypatch.setattr(json, "loads", lambda *a, **k: decodes.append(a) or real(*a, **k))
    sent = json.dumps(data).encode()
    raw, _ = await runtime.complete("chat/completions", Body(sent, data))
    monkeypatch.undo()
    assert decodes  # the client decodes Ollama's answer...
    assert not [a for a in decodes if a[0] == sent]  # ...but nothing decoded the request again
    assert json.loads(raw)["choices"][0]["message"]["content"] == TEXT
    assert recorded(fake, "/api/chat")["messages"] == HELLO


async def test_sampling_options_reach_ollama_and_max_tokens_cuts_with_length(
    host: OllamaHost,
    fake: str,
) -> None:
    runtime = host.runtime("llama3.2:latest")
    raw, usage = await runtime.complete(
        "chat/completions",
        body(
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            temperature=0.3,
            top_p=0.5,
            max_tokens=3,
            seed=7,
            stop=["never"],
            response_format={"type": "json_object"},
        ),
    )
    reply = json.loads(raw)
    assert reply["choices"][0]["message"]["content"] == "The quick brown"
    assert reply["choices"][0]["finish_reason"] == "length"
    assert usage is not None
    assert usage["completion_tokens"] == 3
    sent = recorded(fake, "/api/chat")
    assert sent["options"] == {
        "temperature": 0.3,
        "top_p": 0.5,
        "num_predict": 3,
        "seed": 7,
        "stop": ["never"],
    }
    assert sent["format"] == "json"
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    raw, _ = await runtime.complete("chat/completions", body(messages=HELLO, stop="fox"))
    assert json.loads(raw)["choices"][0]["message"]["content"] == "The quick brown"
    assert json.loads(raw)["choices"][0]["finish_reason"] == "stop"


async def test_streaming_chat_is_role_deltas_finish_and_one_usage_chunk(host: OllamaHost) -> None:
    runtime = host.runtime("llama3.2:latest")
    chunks = [
        json.loads(c)
        async for c in runtime.stream("chat/completions", body(messages=HELLO, stream=True))
    ]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == TEXT
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": len(CANNED),
        "total_tokens": 4 + len(CANNED),
    }
    assert len({c["id"] for c in chunks}) == 1


async def test_completions_use_raw_generate_stream_and_not(host: OllamaHost, fake: str) -> None:
    runtime = host.runtime("llama3.2:latest")
    raw, usage = await runtime.complete("completions", body(prompt="Once upon", max_tokens=2))
    reply = json.loads(raw)
    assert reply["object"] == "text_completion"
    assert reply["choices"][0]["text"] == "The quick"
    assert reply["choices"][0]["finish_reason"] == "length"
    assert usage == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    sent = recorded(fake, "/api/generate")
    assert sent["raw"] is True
    assert sent["prompt"] == "Once upon"
    assert sent["options"] == {"num_predict": 2}
    chunks = [
        json.loads(c)
        async for c in runtime.stream(
            "completions", body(prompt=["Once upon"], max_tokens=2, stream=True)
        )
    ]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "The quick"
    assert chunks[-1]["usage"] == usage


async def test_embeddings_as_floats_and_base64(host: OllamaHost) -> None:
    runtime = host.runtime("nomic-embed-text:latest")
    raw, usage = await runtime.complete("embeddings", body(input=["a b", "c"]))
    reply = json.loads(raw)
    assert [d["embedding"] for d in reply["data"]] == [embedding("a b", 8), embedding("c", 8)]
    assert usage == {"prompt_tokens": 3, "total_tokens": 3}
    raw, _ = await runtime.complete("embeddings", body(input="c", encoding_format="base64"))
    packed = base64.b64decode(json.loads(raw)["data"][0]["embedding"])
    assert list(struct.unpack("<8f", packed)) == pytest.approx(embedding("c", 8), abs=1e-6)


async def test_a_model_ollama_does_not_have_is_a_404_stream_or_not(host: OllamaHost) -> None:
    runtime = host.runtime("gone:latest")
    with pytest.raises(OpenAIError) as caught:
        await runtime.complete("chat/completions", body(messages=HELLO))
    assert caught.value.status == 404
    assert caught.value.code == "model_not_found"
    assert "gone:latest" in caught.value.message
    stream = runtime.stream("chat/completions", body(messages=HELLO, stream=True))
    with pytest.raises(OpenAIError) as caught:
        await anext(stream)
    assert caught.value.status == 404


async def test_requests_ollama_refuses_keep_their_400(host: OllamaHost) -> None:
    with pytest.raises(OpenAIError) as caught:
        await host.runtime("nomic-embed-text:latest").complete(
            "chat/completions", body(messages=HELLO)
        )
    assert caught.value.status == 400
    assert "does not support chat" in caught.value.message
    for bad in (
        body(messages=HELLO, max_tokens="x"),
        body(messages="hi"),
        b"{nope",
        body(prompt=["a", "b"]),
    ):
        endpoint = "completions" if b"prompt" in bad else "chat/completions"
        with pytest.raises(OpenAIError) as caught:
            await host.runtime("llama3.2:latest").complete(endpoint, bad)
        assert caught.value.status == 400


async def test_an_unreachable_ollama_is_a_503_never_a_crash() -> None:
    host = OllamaHost(f"http://127.0.0.1:{free_port()}")
    runtime = host.runtime("llama3.2:latest")
    try:
        with pytest.raises(OpenAIError) as caught:
            await runtime.complete("chat/completions", body(messages=HELLO))
        assert caught.value.status == 503
        assert caught.value.hop == "node"
        with pytest.raises(OpenAIError) as caught:
            await anext(runtime.stream("chat/completions", body(messages=HELLO, stream=True)))
        assert caught.value.status == 503
        with pytest.raises(OpenAIError) as caught:
            await host.discover()
        assert caught.value.status == 503
        with pytest.raises(OpenAIError):
            await runtime.load()
        assert not await runtime.health()
    finally:
        await host.aclose()


async def test_an_error_line_mid_stream_is_a_502_after_the_first_chunks(failing: str) -> None:
    host = OllamaHost(failing)
    try:
        got: list[dict[str, Any]] = []

        async def drain() -> None:
            async for chunk in host.runtime("llama3.2:latest").stream(
                "chat/completions", body(messages=HELLO, stream=True)
            ):
                got.append(json.loads(chunk))

        with pytest.raises(OpenAIError) as caught:
            await drain()
        assert caught.value.status == 502
        assert "fake failure mid-stream" in caught.value.message
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in got) == "The quick"
    finally:
        await host.aclose()


async def test_sync_adds_a_runtime_per_model_and_picks_up_new_ones(
    host: OllamaHost,
    fake: str,
    tmp_path: Path,
) -> None:
    manager = ModelManager(run_dir=tmp_path)
    assert await host.sync(manager) == ["llama3.2:latest", "nomic-embed-text:latest", "smol:latest"]
    assert all(manager.stats()[n]["kind"] == "ollama" for n in manager.names())
    await ollama.AsyncClient(host=fake).copy("smol:latest", "smol-copy")
    try:
        assert await host.sync(manager) == ["smol-copy:latest"]
        assert await host.sync(manager) == []
        runtime = manager.get("smol-copy:latest")
        assert isinstance(runtime, OllamaRuntime)
    finally:
        await ollama.AsyncClient(host=fake).delete("smol-copy")


