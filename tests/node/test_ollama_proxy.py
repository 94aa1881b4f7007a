"""The node proxy in front of the fake Ollama server (its own process, Ollama's wire
protocol) on a loopback port, with the official `openai` client: chat, completions,
embeddings, errors, cancelling, tool calls."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from node_agent.models import ModelManager
from node_agent.runtimes.ollama import OllamaHost
from tests.node.fake_ollama_server import CANNED, TOOL_ARGUMENTS, embedding, free_port
from tests.node.ollama_harness import (
    HELLO,
    TEXT,
    body,
    recorded,
    run_fake,
    run_slow,
    streams,
    wait_for,
)
from tests.node.proxy_thread import NodeThread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    yield from run_fake()


@pytest.fixture(scope="module")
def slow() -> Iterator[str]:
    yield from run_slow()


# --- through the node proxy with the openai client ----------------------------------------


@pytest.fixture(scope="module")
def node(fake: str, slow: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeThread]:
    async def setup(manager: ModelManager) -> Callable[[], Awaitable[None]]:
        host = OllamaHost(fake)
        await host.sync(manager)
        down = OllamaHost(f"http://127.0.0.1:{free_port()}")
        manager.add_runtime(down.runtime("down", model="llama3.2:latest"))
        slow_host = OllamaHost(slow)
        manager.add_runtime(slow_host.runtime("slow", model="llama3.2:latest"))

        async def cleanup() -> None:
            await host.aclose()
            await down.aclose()
            await slow_host.aclose()

        return cleanup

    with NodeThread(tmp_path_factory.mktemp("node"), setup) as node:
        yield node


@pytest.fixture
def client(node: NodeThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0)


def test_the_openai_client_chats_through_the_proxy(client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list()} >= {"llama3.2:latest", "smol:latest"}
    reply = client.chat.completions.create(
        model="llama3.2:latest", messages=HELLO, max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content == "The quick brown fox"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 4
    chunks = list(
        client.chat.completions.create(
            model="smol:latest", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(CANNED)


def test_the_openai_client_completes_and_embeds_through_the_proxy(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="smol:latest", prompt="Once", max_tokens=2)
    assert reply.choices[0].text == "The quick"
    vectors = client.embeddings.create(model="nomic-embed-text:latest", input=["a b", "c"])
    assert [d.embedding for d in vectors.data] == [
        pytest.approx(embedding("a b", 8), abs=1e-6),
        pytest.approx(embedding("c", 8), abs=1e-6),
    ]


def test_ollama_errors_reach_the_openai_client_as_its_own_exceptions(
    client: openai.OpenAI,
) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="not-served", messages=HELLO)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="nomic-embed-text:latest", messages=HELLO)
    assert "does not support chat" in str(bad.value)
    with pytest.raises(openai.InternalServerError) as down:
        client.chat.completions.create(model="down", messages=HELLO)
    assert down.value.status_code == 503
    assert "unreachable" in str(down.value)
    with pytest.raises(openai.InternalServerError) as down:
        client.chat.completions.create(model="down", messages=HELLO, stream=True)
    assert down.value.status_code == 503


async def test_closing_the_stream_cancels_it_at_ollama(slow: str) -> None:
    host = OllamaHost(slow)
    try:
        before = streams(slow)["cancelled"]
        chunks = host.runtime("llama3.2:latest").stream(
            "chat/completions", body(messages=HELLO, stream=True)
        )
        assert json.loads(await anext(chunks))["choices"][0]["delta"]["role"] == "assistant"
        await chunks.aclose()  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while streams(slow)["cancelled"] == before:
            assert time.monotonic() < deadline, "the fake Ollama kept generating"
            await asyncio.sleep(0.05)
    finally:
        await host.aclose()


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/chat/completions", {"model": "slow", "messages": HELLO, "stream": True}),
        ("/api/chat", {"model": "slow", "messages": HELLO}),
    ],
)
def test_a_client_leaving_the_proxy_mid_stream_stops_ollama(
    node: NodeThread, slow: str, path: str, payload: dict[str, Any]
) -> None:
    before = streams(slow)["cancelled"]
    with httpx.stream("POST", f"{node.url}{path}", json=payload) as reply:
        assert reply.status_code == 200
        assert next(reply.iter_lines())
    wait_for(lambda: streams(slow)["cancelled"] > before, "the fake Ollama kept generating")
    wait_for(lambda: node.manager.stats()["slow"]["in_flight"] == 0, "still in flight")


WEATHER: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]


def test_tool_calls_round_trip_through_the_proxy(client: openai.OpenAI, fake: str) -> None:
    reply = client.chat.completions.create(model="llama3.2:latest", messages=HELLO, tools=WEATHER)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == TOOL_ARGUMENTS  # type: ignore[union-attr]
    assert recorded(fake, "/api/chat")["tools"] == WEATHER

    chunks = list(
        client.chat.completions.create(
            model="llama3.2:latest", messages=HELLO, tools=WEATHER, stream=True
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name if d.function else None) for d in deltas] == [
        (0, "get_weather")
    ]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    history: Any = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "name": "get_weather", "content": "Sunny"},
    ]
    answer = client.chat.completions.create(
        model="llama3.2:latest", tools=WEATHER, messages=history
    )
    assert answer.choices[0].message.content == TEXT  # the tool spoke last: text again
    sent = recorded(fake, "/api/chat")["messages"]
    assert sent[1]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": TOOL_ARGUMENTS}}
    ]
    assert sent[2] == {"role": "tool", "content": "Sunny", "tool_name": "get_weather"}
