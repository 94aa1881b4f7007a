"""OpenAIHttpRuntime and its pure helpers, against httpx's MockTransport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from meshgate.openai import OpenAIError
from node_agent.runtimes.base import usage_of
from node_agent.runtimes.openai_http import (
    OpenAIHttpRuntime,
    SSEParser,
    is_error_event,
    with_model,
)

CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
Handler = Callable[[httpx.Request], httpx.Response]


class Body(httpx.AsyncByteStream):
    """A response body that records whether the client closed it."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part

    async def aclose(self) -> None:
        self.closed = True


def runtime(handler: Handler, **opts: str) -> OpenAIHttpRuntime:
    return OpenAIHttpRuntime("m", "upstream", "http://up/v1",
                             transport=httpx.MockTransport(handler), **opts)


def sse(*payloads: bytes) -> list[bytes]:
    return [b"data: " + p + b"\n\n" for p in payloads]


def test_sse_parser_joins_events_split_across_reads() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"a":1}\n\ndata: {"b"') == [b'{"a":1}']
    assert parser.feed(b':2}\r\n\r\n: comment\n\ndata:[DONE]\n\n') == [b'{"b":2}', b"[DONE]"]


def test_usage_of_reads_only_chunks_that_carry_usage() -> None:
    assert usage_of(b'{"choices":[]}') is None
    assert usage_of(b'{"usage":null}') is None
    assert usage_of(b"not json but mentions \"usage\"") is None
    assert usage_of(b'{"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}') == {
        "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def test_with_model_rewrites_only_when_the_name_differs() -> None:
    same = b'{"model":"up","x":1}'
    assert with_model(same, "up") is same
    assert json.loads(with_model(b'{"model": "mine", "x": 1}', "up")) == {"model": "up", "x": 1}


def test_error_events_are_told_from_chunks() -> None:
    assert is_error_event(b'{"error": {"message": "x"}}')
    assert is_error_event(b'{ "error" : {"message": "x"}}')
    assert not is_error_event(b'{"id":"c","choices":[{"delta":{"content":"error"}}]}')


async def test_complete_passes_bytes_through_and_rewrites_the_model_for_upstreams() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b'{"usage":{"prompt_tokens":2,"completion_tokens":1,'
                                           b'"total_tokens":3}}')

    rt = runtime(handler, upstream_model="gpt-x")
    data, usage = await rt.complete("chat/completions", b'{"model":"m","messages":[]}')
    assert usage == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    assert seen[0].url == "http://up/v1/chat/completions"
    assert json.loads(seen[0].content)["model"] == "gpt-x"
    assert data.startswith(b'{"usage"')


async def test_runner_errors_keep_their_status_and_message() -> None:
    def handler(_: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"error": {"message": "nope", "type": "x", "code": "c"}})

    with pytest.raises(OpenAIError) as caught:
        await runtime(handler).complete("completions", b"{}")
    assert (caught.value.status, caught.value.message, caught.value.hop) == (422, "nope", "runner")
    with pytest.raises(OpenAIError) as streamed:
        await anext(runtime(handler).stream("chat/completions", CHAT))
    assert streamed.value.status == 422


async def test_an_unreachable_runner_is_a_503_from_the_node() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(OpenAIError) as caught:
        await runtime(handler).complete("completions", b"{}")
    assert (caught.value.status, caught.value.hop) == (503, "node")
    assert not await runtime(handler).health()


async def test_stream_yields_payloads_and_stops_at_done() -> None:
    body = Body(sse(b'{"choices":[{"delta":{"content":"a"}}]}', b'{"choices":[],"usage":{}}',
                    b"[DONE]"))
    rt = runtime(lambda _: httpx.Response(200, stream=body))
    chunks = [c async for c in rt.stream("chat/completions", CHAT)]
    assert chunks == [b'{"choices":[{"delta":{"content":"a"}}]}', b'{"choices":[],"usage":{}}']
    assert body.closed


async def test_a_stream_cut_short_or_failing_raises_after_its_chunks() -> None:
    cut = runtime(lambda _: httpx.Response(200, stream=Body(sse(b'{"choices":[]}'))))
    got: list[bytes] = []

    async def drain(stream: AsyncIterator[bytes]) -> None:
        async for chunk in stream:
            got.append(chunk)

    with pytest.raises(OpenAIError, match="without \\[DONE\\]"):
        await drain(cut.stream("chat/completions", CHAT))
    assert got == [b'{"choices":[]}']
    failing = runtime(lambda _: httpx.Response(200, stream=Body(
        sse(b'{"choices":[]}', b'{"error": {"message": "boom", "hop": "runner"}}'))))
    with pytest.raises(OpenAIError, match="boom"):
        await drain(failing.stream("chat/completions", CHAT))


async def test_closing_a_stream_early_closes_the_runners_response() -> None:
    body = Body(sse(b'{"n":1}', b'{"n":2}', b"[DONE]"))
    stream = runtime(lambda _: httpx.Response(200, stream=body)).stream("chat/completions", CHAT)
    assert await anext(stream) == b'{"n":1}'
    await stream.aclose()  # type: ignore[attr-defined]
    assert body.closed
