"""OpenAIHttpRuntime and its pure helpers, against a small aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from meshgate.openai import OpenAIError
from node_agent.runtimes.base import usage_of
from node_agent.runtimes.openai_http import (
    OpenAIHttpRuntime,
    SSEParser,
    is_error_event,
    with_model,
)

CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Server:
    """One handler for every POST and GET under /v1/, on a loopback port; records requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.seen: list[tuple[str, bytes]] = []
        self.disconnected = asyncio.Event()
        self.connections = 0
        self._transports: set[object] = set()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, await request.read()))
        transport = request.transport
        if transport is not None and transport not in self._transports:
            self._transports.add(transport)
            self.connections += 1
        try:
            return await self.handler(request)
        except asyncio.CancelledError:
            self.disconnected.set()  # aiohttp cancels the handler when its client leaves
            raise

    async def __aenter__(self) -> str:
        app = web.Application(handler_args={"handler_cancellation": True})
        app.router.add_route("*", "/v1/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *_: object) -> None:
        await self.runner.cleanup()


def sse(*payloads: bytes) -> list[bytes]:
    return [b"data: " + p + b"\n\n" for p in payloads]


def streaming(parts: list[bytes], hold: asyncio.Event | None = None,
              end_after: float = 0.0) -> Handler:
    """Send `parts`; end the body once `hold` is set, `end_after` seconds later (a runner
    that ends its body a moment after its last event)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for part in parts:
            await response.write(part)
        if hold is not None:
            await hold.wait()
        await asyncio.sleep(end_after)
        await response.write_eof()
        return response

    return handler


def answer(status: int, body: object) -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status)

    return handler


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
    # found as the key, from the end: text or values that say "usage" are not it
    assert usage_of(b'{"m":"say \\"usage\\": {}","usage" : {"prompt_tokens":4,"x":true,'
                    b'"d":{"cached_tokens":1}},"o":"usage"}') == {"prompt_tokens": 4}
    assert usage_of('{"c":"\u00e9t\u00e9","usage":{"total_tokens":5}}'.encode()) == {
        "total_tokens": 5}
    assert usage_of(b'{"usage":[1]}') is None
    assert usage_of(b'{"usage":{"prompt_tokens":') is None  # cut short


def test_with_model_rewrites_only_when_the_name_differs() -> None:
    same = b'{"model":"up","x":1}'
    assert with_model(same, "up") is same
    assert json.loads(with_model(b'{"model": "mine", "x": 1}', "up")) == {"model": "up", "x": 1}


def test_error_events_are_told_from_chunks() -> None:
    assert is_error_event(b'{"error": {"message": "x"}}')
    assert is_error_event(b'{ "error" : {"message": "x"}}')
    assert not is_error_event(b'{"id":"c","choices":[{"delta":{"content":"error"}}]}')


async def test_complete_passes_bytes_through_and_rewrites_the_model_for_upstreams() -> None:
    server = Server(answer(200, {"usage": {"prompt_tokens": 2, "completion_tokens": 1,
                                           "total_tokens": 3}}))
    async with server as url:
        rt = OpenAIHttpRuntime("m", "upstream", url, upstream_model="gpt-x")
        try:
            data, usage = await rt.complete("chat/completions", b'{"model":"m","messages":[]}')
        finally:
            await rt.aclose()
    assert usage == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    path, body = server.seen[0]
    assert path == "/v1/chat/completions"
    assert json.loads(body)["model"] == "gpt-x"
    assert data.startswith(b'{"usage"')


async def test_runner_errors_keep_their_status_and_message() -> None:
    async with Server(answer(422, {"error": {"message": "nope", "type": "x", "code": "c"}})) as url:
        rt = OpenAIHttpRuntime("m", "upstream", url)
        try:
            with pytest.raises(OpenAIError) as caught:
                await rt.complete("completions", b"{}")
            assert (caught.value.status, caught.value.message, caught.value.hop) == (
                422, "nope", "runner")
            with pytest.raises(OpenAIError) as streamed:
                await anext(rt.stream("chat/completions", CHAT))
            assert streamed.value.status == 422
        finally:
            await rt.aclose()


async def test_an_unreachable_runner_is_a_503_from_the_node(tmp_path: object) -> None:
    rt = OpenAIHttpRuntime("m", "llama.cpp", "http://runner/v1", uds="/nonexistent/runner.sock")
    try:
        with pytest.raises(OpenAIError) as caught:
            await rt.complete("completions", b"{}")
        assert (caught.value.status, caught.value.hop) == (503, "node")
        with pytest.raises(OpenAIError) as streamed:
            await anext(rt.stream("chat/completions", CHAT))
        assert (streamed.value.status, streamed.value.hop) == (503, "node")
        assert not await rt.health()
    finally:
        await rt.aclose()


async def drain(stream: AsyncIterator[bytes], got: list[bytes]) -> None:
    async for chunk in stream:
        got.append(chunk)


async def test_stream_yields_payloads_stops_at_done_and_keeps_the_connection() -> None:
    parts = sse(b'{"choices":[{"delta":{"content":"a"}}]}', b'{"choices":[],"usage":{}}',
                b"[DONE]")
    server = Server(streaming(parts, end_after=0.05))
    async with server as url:
        rt = OpenAIHttpRuntime("m", "upstream", url)
        try:
            for _ in range(3):
                chunks: list[bytes] = []
                await drain(rt.stream("chat/completions", CHAT), chunks)
                assert chunks == [b'{"choices":[{"delta":{"content":"a"}}]}',
                                  b'{"choices":[],"usage":{}}']
            # read to its end after [DONE], each stream gave its connection back: one for all
            assert rt.pool.idle_connections == 1
            assert server.connections == 1
        finally:
            await rt.aclose()


async def test_a_stream_cut_short_or_failing_raises_after_its_chunks() -> None:
    async with Server(streaming(sse(b'{"choices":[]}'))) as url:
        rt = OpenAIHttpRuntime("m", "upstream", url)
        got: list[bytes] = []
        try:
            with pytest.raises(OpenAIError, match="without \\[DONE\\]"):
                await drain(rt.stream("chat/completions", CHAT), got)
        finally:
            await rt.aclose()
    assert got == [b'{"choices":[]}']
    failing = streaming(sse(b'{"choices":[]}', b'{"error": {"message": "boom", "hop": "runner"}}'))
    async with Server(failing) as url:
        rt = OpenAIHttpRuntime("m", "upstream", url)
        try:
            with pytest.raises(OpenAIError, match="boom"):
                await drain(rt.stream("chat/completions", CHAT), [])
        finally:
            await rt.aclose()


async def test_closing_a_stream_early_closes_the_runners_connection() -> None:
    hold = asyncio.Event()
    server = Server(streaming(sse(b'{"n":1}', b'{"n":2}'), hold))
    async with server as url:
        rt = OpenAIHttpRuntime("m", "upstream", url)
        try:
            stream = rt.stream("chat/completions", CHAT)
            assert await anext(stream) == b'{"n":1}'
            await stream.aclose()  # type: ignore[attr-defined]
            # the runner sees its client go: it stops generating
            await asyncio.wait_for(server.disconnected.wait(), 5)
        finally:
            hold.set()
            await rt.aclose()


async def test_events_one_read_brought_come_as_one_batch_errors_after_them() -> None:
    hold = asyncio.Event()
    first, second = b"".join(sse(b'{"n":1}', b'{"n":2}', b'{"n":3}')), b"".join(
        sse(b'{"n":4}', b"[DONE]"))

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first)  # one write: one read at the node (loopback, unhurried)
        await hold.wait()
        await response.write(second)
        await response.write_eof()
        return response

    async with Server(handler) as url:
        rt = OpenAIHttpRuntime("m", "upstream", url)
        try:
            batches = rt.stream_batches("chat/completions", CHAT)
            assert await anext(batches) == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
            hold.set()
            assert [b async for b in batches] == [[b'{"n":4}']]
            assert rt.pool.idle_connections == 1  # read to its end: kept
        finally:
            await rt.aclose()
    failing = b"".join(sse(b'{"n":1}', b'{"n":2}', b'{"error": {"message": "boom"}}'))
    async with Server(streaming([failing])) as url:
        rt = OpenAIHttpRuntime("m", "upstream", url)
        got: list[list[bytes]] = []

        async def read_all() -> None:
            async for batch in rt.stream_batches("chat/completions", CHAT):
                got.append(batch)

        try:
            with pytest.raises(OpenAIError, match="boom"):
                await read_all()
        finally:
            await rt.aclose()
        assert got == [[b'{"n":1}', b'{"n":2}']]  # what came before the error, first
