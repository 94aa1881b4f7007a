"""Both bounded HTTP protocols (httptools and h11) against raw sockets on loopback: head,
body and write timeouts, the connection cap, the head size limit, keep-alive and pipelining,
and the corked writes (one ``send()`` per loop turn)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from meshgate.http_protocols import CORK_MAX_BYTES, SSE_CORK, CorkedTransport
from meshgate.httpserver import HttpLimits, server_config
from meshgate.logflood import FloodFilter

PARSERS = ["httptools", "h11"]
FAST = HttpLimits(head_timeout_s=0.3, body_timeout_s=0.3, write_timeout_s=0.3,
                  keep_alive_s=5.0, max_connections=16)
GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


class App:
    """``/x``: "ok"; ``/echo``: the body back; ``/block``: waits for `release`;
    ``/firehose``: 64 KiB chunks until the client is gone (then `gone` is set);
    ``/sse``: three chunks, uncorked after the first as a token stream does (httptools only);
    ``/corked``: whether the connection's transport holds writes ("yes"/"no"/"none")."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.gone = asyncio.Event()
        self.blocked = 0
        self.all_blocked = asyncio.Event()  # set when `FAST.max_connections` are blocked
        self.parser = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        body = b"ok"
        if path == "/echo":
            parts = []
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
            body = b"".join(parts)
        elif path == "/block":
            self.blocked += 1
            if self.blocked == FAST.max_connections:
                self.all_blocked.set()
            await self.release.wait()
        elif path == "/firehose":
            await self.firehose(receive, send)
            return
        elif path == "/sse":
            await self.sse(scope, send)
            return
        elif path == "/corked":
            cork = scope.get(SSE_CORK)
            body = b"none" if cork is None else b"yes" if cork.corked else b"no"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def sse(self, scope: dict[str, Any], send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for n in range(3):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % n,
                        "more_body": True})
            if n == 0 and SSE_CORK in scope:
                scope[SSE_CORK].uncork()
        await send({"type": "http.response.body", "body": b""})

    async def firehose(self, receive: Any, send: Any) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.gone.set()

        watcher = asyncio.create_task(watch())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        piece = b"x" * 65536
        while not self.gone.is_set():
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await watcher


@pytest.fixture(params=PARSERS)
async def server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[int, App]]:
    app = App()
    app.parser = request.param
    config = server_config(app, FAST, parser=request.param, host="127.0.0.1", port=0,
                           log_level="warning", lifespan="off", log_config=None)
    srv = uvicorn.Server(config)
    srv.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(srv.serve())
    while not srv.started:  # uvicorn has no event for it
        assert not task.done(), "server did not start"
        await asyncio.sleep(0.01)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield port, app
    finally:
        app.release.set()
        srv.should_exit = True
        await task
        unflood()


def unflood() -> None:
    """Take off the flood filter server_config put on every handler (pytest's included)."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for handler in {h for lg in loggers for h in lg.handlers}:
        for f in [f for f in handler.filters if isinstance(f, FloodFilter)]:
            handler.removeFilter(f)


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def closed_after(reader: asyncio.StreamReader, limit: float = 5.0) -> float:
    """Seconds until the server closes the connection (reading and dropping what it sends)."""
    started = time.monotonic()
    async with asyncio.timeout(limit):
        with contextlib.suppress(ConnectionResetError):
            while await reader.read(65536):
                pass
    return time.monotonic() - started


async def response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(
    server: tuple[int, App],
) -> None:
    port, _ = server
    reader, writer = await connect(port)
    writer.write(GET)
    assert (await response(reader)).endswith(b"\r\n\r\nok")
    writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc" + GET)
    assert (await response(reader)).endswith(b"\r\n\r\nabc")
    assert (await response(reader)).endswith(b"\r\n\r\nok")
    writer.close()


async def test_after_an_uncorked_stream_the_next_answer_on_the_connection_is_corked_again(
    server: tuple[int, App],
) -> None:
    port, app = server
    held = b"yes" if app.parser == "httptools" else b"none"  # h11 (the rare client) never corks
    reader, writer = await connect(port)
    writer.write(b"GET /corked HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await response(reader)).endswith(b"\r\n\r\n" + held)  # a new connection holds writes
    writer.write(b"GET /sse HTTP/1.1\r\nHost: t\r\n\r\n")
    streamed = await reader.readuntil(b"data: 2\n\n\r\n0\r\n\r\n")  # chunked, to its last chunk
    assert b"data: 0" in streamed
    assert b"data: 1" in streamed
    writer.write(b"GET /corked HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await response(reader)).endswith(b"\r\n\r\n" + held)  # the uncork ended with the stream
    writer.close()


async def test_a_slow_head_is_cut_also_on_a_kept_alive_connection(
    server: tuple[int, App],
) -> None:
    port, _ = server
    reader, writer = await connect(port)
    writer.write(b"GET /x HTTP/1.1\r\n")
    assert 0.2 < await closed_after(reader) < 3
    reader, writer = await connect(port)
    writer.write(GET)
    await response(reader)
    writer.write(b"GET /x HTTP/1.1\r\nHo")  # the next request's head stalls
    assert 0.2 < await closed_after(reader) < 3


async def test_a_stalled_body_is_cut(server: tuple[int, App]) -> None:
    port, _ = server
    reader, writer = await connect(port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc")
    assert 0.2 < await closed_after(reader) < 3


async def test_a_head_over_the_limit_is_refused_before_it_ends(
    server: tuple[int, App],
) -> None:
    port, _ = server
    reader, writer = await connect(port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000)  # and on...
    answer = await reader.read(65536)
    assert answer.startswith(b"HTTP/1.1 400")
    assert await closed_after(reader) < 0.2  # at once, not at the head timeout


async def test_a_whole_head_over_the_limit_is_refused_by_httptools(
    server: tuple[int, App],
) -> None:
    port, app = server
    if app.parser == "h11":
        pytest.skip("h11 limits only a head still incomplete; a whole one in one read passes")
    reader, writer = await connect(port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    answer = await reader.read(65536)
    assert answer.startswith(b"HTTP/1.1 400")


async def test_a_client_that_reads_nothing_is_disconnected(server: tuple[int, App]) -> None:
    port, app = server
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    sock.send(b"GET /firehose HTTP/1.1\r\nHost: t\r\n\r\n")
    started = time.monotonic()
    try:
        await asyncio.wait_for(app.gone.wait(), 5)
        assert time.monotonic() - started > 0.25
    finally:
        sock.close()


async def test_past_the_cap_the_longest_idle_connection_makes_room(
    server: tuple[int, App],
) -> None:
    port, _ = server
    idle = [await connect(port) for _ in range(FAST.max_connections)]
    reader, writer = await connect(port)  # one more, prompt
    writer.write(GET)
    assert (await response(reader)).endswith(b"ok")
    assert await closed_after(idle[0][0], 1.0) < 1.0  # the oldest idle one went
    for _, w in idle:
        w.close()
    writer.close()


async def test_when_every_connection_is_busy_a_new_one_is_closed_at_once(
    server: tuple[int, App],
) -> None:
    port, app = server
    busy = []
    for _ in range(FAST.max_connections):
        reader, writer = await connect(port)
        writer.write(b"GET /block HTTP/1.1\r\nHost: t\r\n\r\n")
        busy.append((reader, writer))
    await asyncio.wait_for(app.all_blocked.wait(), 5)
    reader, writer = await connect(port)
    writer.write(GET)
    assert await closed_after(reader, 1.0) < 1.0
    app.release.set()
    for r, _ in busy:
        assert (await response(r)).endswith(b"ok")  # requests in flight were never cut
    for _, w in busy:
        w.close()


class Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> str:
        return f"extra {name}"


async def test_writes_in_one_loop_turn_leave_as_one() -> None:
    recorder = Recorder()
    corked = CorkedTransport(recorder, asyncio.get_running_loop())  # type: ignore[arg-type]
    corked.write(b"head ")
    corked.write(b"body")
    assert recorder.writes == []
    assert corked.get_write_buffer_size() == 9
    await asyncio.sleep(0)
    assert recorder.writes == [b"head body"]
    corked.write(b"x" * CORK_MAX_BYTES)  # past the cap: sent at once
    assert recorder.writes[-1] == b"x" * CORK_MAX_BYTES
    corked.write(b"last")
    corked.close()  # sends what is held first
    assert recorder.writes[-1] == b"last"
    assert recorder.closed
    assert corked.get_extra_info("peername") == "extra peername"
    corked.write(b"dropped")
    corked.abort()
    await asyncio.sleep(0)
    assert recorder.writes[-1] == b"last"
    assert recorder.aborted


async def test_an_uncorked_transport_writes_at_once_until_corked_again() -> None:
    recorder = Recorder()
    corked = CorkedTransport(recorder, asyncio.get_running_loop())  # type: ignore[arg-type]
    corked.write(b"head ")
    corked.write(b"first")
    corked.uncork()  # what is held leaves now, in one write
    assert recorder.writes == [b"head first"]
    corked.write(b"burst")  # each later write at once, as made
    assert recorder.writes == [b"head first", b"burst"]
    await asyncio.sleep(0)  # the flush the first write asked for finds nothing held
    assert recorder.writes == [b"head first", b"burst"]
    corked.corked = True  # the next response (GuardedHttpToolsProtocol.on_response_complete)
    corked.write(b"next ")
    corked.write(b"answer")
    assert recorder.writes == [b"head first", b"burst"]
    await asyncio.sleep(0)
    assert recorder.writes[-1] == b"next answer"
