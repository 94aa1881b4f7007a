"""A request answered below ASGI (meshgate/http_hot.py) on the httptools protocol starts its
task once its body is in when the body is small and declared (the task then runs without
waiting for it); a large or chunked body, ``Expect: 100-continue``, or a client that leaves
mid-body start it as before, and every one of them is answered (or hears the loss)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

from meshgate.http_hot import HotExchange
from meshgate.http_protocols import GuardedHttpToolsProtocol
from tests.coordinator.coordinator_harness import served
from tests.meshgate.test_httpserver import connect, response


class HotApp:
    """``POST /hot`` answered below ASGI: the body back; notes, for each request, whether
    its body was all in when its runner started (`whole_at_start`) and a client gone."""

    def __init__(self) -> None:
        self.whole_at_start: list[bool] = []
        self.started = asyncio.Event()
        self.gone = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def hot_runner(self, scope: dict[str, Any]) -> Callable[[HotExchange], Awaitable[None]] | None:
        return self.run if scope["path"] == "/hot" and scope["method"] == "POST" else None

    async def run(self, exchange: HotExchange) -> None:
        self.whole_at_start.append(not exchange.cycle.more_body)
        self.started.set()
        parts = []
        while True:
            message = await exchange.receive()
            if message["type"] == "http.disconnect":
                self.gone.set()
                return
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        await exchange.respond(200, [], b"".join(parts))


@pytest.fixture
async def hot(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[int, HotApp,
                                                                        asyncio.Event]]:
    """(port, app, set once the server has parsed a request head), on the daemons' own
    protocol."""
    app = HotApp()
    heads = asyncio.Event()
    parsed = GuardedHttpToolsProtocol.on_headers_complete

    def noted(self: GuardedHttpToolsProtocol) -> None:
        parsed(self)
        heads.set()

    monkeypatch.setattr(GuardedHttpToolsProtocol, "on_headers_complete", noted)
    async with served(app, daemon=True) as url:  # returns once uvicorn listens
        yield int(url.rsplit(":", 1)[1]), app, heads


def _head(length: int | None, extra: bytes = b"") -> bytes:
    size = b"transfer-encoding: chunked\r\n" if length is None else b"content-length: %d\r\n" % (
        length)
    return b"POST /hot HTTP/1.1\r\nHost: t\r\n" + size + extra + b"\r\n"


async def test_a_small_body_is_in_when_the_task_starts(
        hot: tuple[int, HotApp, asyncio.Event]) -> None:
    port, app, heads = hot
    reader, writer = await connect(port)
    writer.write(_head(5))
    await asyncio.wait_for(heads.wait(), 5)
    for _ in range(3):  # a task made at the head would have run by now
        await asyncio.sleep(0)
    assert app.whole_at_start == []
    writer.write(b"hello")
    assert (await response(reader)).endswith(b"\r\n\r\nhello")
    assert app.whole_at_start == [True]
    writer.write(_head(2) + b"ok")  # kept alive: the next one alike (head and body together)
    assert (await response(reader)).endswith(b"\r\n\r\nok")
    assert app.whole_at_start == [True, True]
    writer.close()


@pytest.mark.parametrize("length", [HIGH_WATER_LIMIT + 1, None], ids=["large", "chunked"])
async def test_a_large_or_chunked_body_starts_its_task_at_the_head(
        hot: tuple[int, HotApp, asyncio.Event], length: int | None) -> None:
    port, app, _ = hot
    reader, writer = await connect(port)
    writer.write(_head(length))
    await asyncio.wait_for(app.started.wait(), 5)  # before any of the body was sent
    body = b"x" * (HIGH_WATER_LIMIT + 1)
    writer.write(body if length is not None else b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    assert (await response(reader)).endswith(b"\r\n\r\n" + body)
    assert app.whole_at_start == [False]
    writer.close()


async def test_expect_100_continue_starts_its_task_at_the_head(
        hot: tuple[int, HotApp, asyncio.Event]) -> None:
    port, app, _ = hot
    reader, writer = await connect(port)
    writer.write(_head(5, b"expect: 100-continue\r\n"))
    # the client waits for this before it sends the body: a task started only once the
    # body is in would never send it
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
        b"HTTP/1.1 100 Continue\r\n\r\n")
    writer.write(b"hello")
    assert (await response(reader)).endswith(b"\r\n\r\nhello")
    assert app.whole_at_start == [False]
    writer.close()


async def test_a_client_gone_mid_body_starts_the_task_which_hears_it(
        hot: tuple[int, HotApp, asyncio.Event]) -> None:
    port, app, heads = hot
    _, writer = await connect(port)
    writer.write(_head(10) + b"half")
    await asyncio.wait_for(heads.wait(), 5)
    writer.close()
    await asyncio.wait_for(app.gone.wait(), 5)
    assert app.whole_at_start == [False]


async def test_a_pipelined_request_whose_body_comes_later_is_answered_once_it_is_in(
        hot: tuple[int, HotApp, asyncio.Event]) -> None:
    port, app, _ = hot
    reader, writer = await connect(port)
    writer.write(_head(3) + b"one" + _head(3) + b"t")  # the second's body not all in
    assert (await response(reader)).endswith(b"\r\n\r\none")
    writer.write(b"wo")
    assert (await response(reader)).endswith(b"\r\n\r\ntwo")
    assert app.whole_at_start == [True, True]
    writer.close()
