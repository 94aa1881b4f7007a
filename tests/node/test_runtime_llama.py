"""The real path: our llama.cpp worker serving SmolLM2 under the supervisor,
driven through OpenAIHttpRuntime over its unix socket."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from meshgate.openai import OpenAIError
from node_agent.runtimes.llama.supervisor import LlamaRunner

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

HELLO = [{"role": "user", "content": "Say hello."}]
COUNT = "Count from 1 to 100: 1, 2, 3,"


def chat(max_tokens: int = 8, **extra: Any) -> bytes:
    return json.dumps({"model": "smollm2", "messages": HELLO, "max_tokens": max_tokens,
                       "temperature": 0, **extra}).encode()


def completion(prompt: str = COUNT, max_tokens: int = 8, **extra: Any) -> bytes:
    return json.dumps({"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, **extra}).encode()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runner(model_path: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[LlamaRunner]:
    runner = LlamaRunner("smollm2", model_path, run_dir=tmp_path_factory.mktemp("run"),
                         n_ctx=512, ready_timeout=60)
    await runner.start()
    yield runner
    await runner.stop()


async def worker_health(runner: LlamaRunner) -> dict[str, Any]:
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(runner.socket))) as c:
        reply = await c.get("http://runner/health")
    data: dict[str, Any] = reply.json()
    return data


async def collect(runner: LlamaRunner, endpoint: str, body: bytes) -> list[dict[str, Any]]:
    return [json.loads(c) async for c in runner.runtime.stream(endpoint, body)]


def content_of(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]


async def test_chat_answers_with_text_usage_and_the_served_name(runner: LlamaRunner) -> None:
    data, usage = await runner.runtime.complete("chat/completions", chat())
    reply = json.loads(data)
    assert reply["model"] == "smollm2"
    assert reply["choices"][0]["message"]["content"]
    assert usage == reply["usage"]
    assert usage is not None
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= 8


async def test_streamed_chat_ends_with_usage_equal_to_the_unstreamed_usage(
    runner: LlamaRunner,
) -> None:
    _, plain = await runner.runtime.complete("chat/completions", chat(12))
    chunks = await collect(runner, "chat/completions", chat(12, stream=True))
    last = chunks[-1]
    assert last["choices"] == []
    assert last["object"] == "chat.completion.chunk"
    assert last["id"] == chunks[0]["id"]
    assert last["usage"] == plain
    assert [c for c in chunks if "usage" in c] == [last]
    pieces = [p for p in content_of(chunks) if p]
    assert len(pieces) == last["usage"]["completion_tokens"]  # one content chunk per token


async def test_streamed_chat_that_stops_on_its_own_counts_no_end_token(
    runner: LlamaRunner,
) -> None:
    body = {"messages": [{"role": "user", "content": "Reply with just: OK"}], "max_tokens": 16}
    _, plain = await runner.runtime.complete("chat/completions", chat(**body))
    chunks = await collect(runner, "chat/completions", chat(**body, stream=True))
    assert chunks[-1]["usage"] == plain
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] in {"stop", "length"}


async def test_streamed_completion_ends_with_usage_and_done(runner: LlamaRunner) -> None:
    _, plain = await runner.runtime.complete("completions", completion(max_tokens=6))
    chunks = await collect(runner, "completions", completion(max_tokens=6, stream=True))
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text
    assert chunks[-1]["object"] == "text_completion"
    assert chunks[-1]["usage"] == plain


async def test_two_concurrent_requests_both_finish_without_interrupting_each_other(
    runner: LlamaRunner,
) -> None:
    alone = await collect(runner, "completions", completion(max_tokens=40, stream=True))
    first = asyncio.create_task(collect(runner, "completions", completion(max_tokens=40,
                                                                          stream=True)))
    await asyncio.sleep(0.1)  # the first is generating when the second arrives
    second = asyncio.create_task(runner.runtime.complete("chat/completions", chat(8)))
    together, (_, usage) = await asyncio.gather(first, second)
    assert together[-1]["usage"] == alone[-1]["usage"]
    assert together[-1]["usage"]["completion_tokens"] == 40
    texts = ["".join(c["choices"][0]["text"] for c in run if c["choices"]) for run in
             (alone, together)]
    assert texts[0] == texts[1]
    assert usage is not None
    assert usage["completion_tokens"] == 8


async def test_closing_a_stream_early_stops_generation_at_once(runner: LlamaRunner) -> None:
    before = await worker_health(runner)
    stream = runner.runtime.stream("completions", completion(max_tokens=400, stream=True))
    for _ in range(3):
        await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    began = time.monotonic()
    _, usage = await runner.runtime.complete("completions", completion(max_tokens=4))
    assert time.monotonic() - began < 2.0  # 400 tokens would take seconds more
    assert usage is not None
    assert usage["completion_tokens"] == 4
    after = await worker_health(runner)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["pending"] == 0


async def test_a_prompt_longer_than_the_context_is_a_400_from_the_runner(
    runner: LlamaRunner,
) -> None:
    with pytest.raises(OpenAIError) as caught:
        await runner.runtime.complete("completions", completion("word " * 600))
    assert (caught.value.status, caught.value.hop) == (400, "runner")
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 512 tokens" in caught.value.message
    with pytest.raises(OpenAIError) as streamed:
        await anext(runner.runtime.stream("completions", completion("word " * 600, stream=True)))
    assert (streamed.value.status, streamed.value.code) == (400, "context_length_exceeded")


async def test_max_tokens_past_the_context_is_a_400_not_a_shortened_answer(
    runner: LlamaRunner,
) -> None:
    body = json.dumps({"model": "smollm2", "prompt": "Hi", "max_tokens": 100000}).encode()
    with pytest.raises(OpenAIError) as caught:
        await runner.runtime.complete("completions", body)
    assert (caught.value.status, caught.value.code) == (400, "context_length_exceeded")
    assert "100000 in the completion" in caught.value.message


async def test_embeddings_open_their_own_context_on_the_first_request(
    runner: LlamaRunner,
) -> None:
    assert not (await worker_health(runner))["embeddings_open"]
    data, _ = await runner.runtime.complete(
        "embeddings", b'{"model":"smollm2","input":["a cat","a dog"]}')
    vectors = [d["embedding"] for d in json.loads(data)["data"]]
    assert len(vectors) == 2
    assert all(abs(sum(x * x for x in v) - 1) < 1e-3 for v in vectors)  # unit length
    assert (await worker_health(runner))["embeddings_open"]
    with pytest.raises(OpenAIError) as caught:
        await runner.runtime.complete(
            "embeddings", json.dumps({"model": "smollm2", "input": "word " * 700}).encode())
    assert (caught.value.status, caught.value.code) == (400, "context_length_exceeded")


async def test_models_and_health_name_the_model(runner: LlamaRunner) -> None:
    assert await runner.runtime.health()
    assert (await worker_health(runner))["model"] == "smollm2"
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(runner.socket))) as c:
        models = (await c.get("http://runner/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["smollm2"]

