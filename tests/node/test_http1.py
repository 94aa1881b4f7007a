"""The node's pooled HTTP/1.1 client against scripted raw-socket servers on loopback:
kept-alive reuse, a server that asks to close, idle expiry, size limits, broken HTTP,
a connection cut midway, chunked and connection-delimited bodies, and a request
abandoned midway closing its connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from node_agent.runtimes.http1 import Http1Pool, UpstreamError, _Connection

pytestmark = pytest.mark.timeout(30)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (by content-length); (b"", b"") at EOF."""
    head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length) if length else b""


class Server:
    """Runs `script` for each connection; counts connections, notes when each one closes."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.closed = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.closed.set()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *_: object) -> None:
        self.server.close()


def answering(*replies: bytes) -> Script:
    """Answer each request on a connection with the next of `replies`, then wait for EOF."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in replies:
            head, _ = await read_request(reader)
            if not head:
                return
            writer.write(reply)
            await writer.drain()
        await reader.read()

    return script


async def fetch(pool: Http1Pool, body: bytes = b"{}") -> tuple[int, bytes]:
    response = await pool.request("POST", "/v1/x", body)
    try:
        return response.status, await response.read()
    finally:
        response.release()


@pytest.fixture
async def pools() -> AsyncIterator[list[Http1Pool]]:
    made: list[Http1Pool] = []
    yield made
    for pool in made:
        pool.close()


async def test_a_kept_alive_connection_serves_request_after_request(
    pools: list[Http1Pool],
) -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            if not head:
                return
            seen.append((head, body))
            writer.write(ok(b'{"echo":' + body + b"}"))

    async with Server(echo) as port:
        pool = Http1Pool("127.0.0.1", port)
        pools.append(pool)
        for i in range(3):
            assert await fetch(pool, b'{"n":%d}' % i) == (200, b'{"echo":{"n":%d}}' % i)
    assert len(seen) == 3
    assert seen[0][0].startswith(b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"content-type: application/json\r\ncontent-length: 7\r\n" in seen[0][0]
    assert pool.idle_connections == 1


async def test_a_server_that_asks_to_close_gets_a_new_connection_next_time(
    pools: list[Http1Pool],
) -> None:
    server = Server(answering(ok(b"{}", b"connection: close\r\n")))
    async with server as port:
        pool = Http1Pool("127.0.0.1", port)
        pools.append(pool)
        assert await fetch(pool) == (200, b"{}")
        assert pool.idle_connections == 0
        assert await fetch(pool) == (200, b"{}")
    assert server.connections == 2


async def test_a_connection_idle_past_keepalive_is_not_reused(pools: list[Http1Pool]) -> None:
    server = Server(answering(ok(b"{}"), ok(b"{}")))
    async with server as port:
        pool = Http1Pool("127.0.0.1", port, keepalive_s=0.0)
        pools.append(pool)
        await fetch(pool)
        await fetch(pool)
    assert server.connections == 2


async def test_chunked_and_connection_delimited_bodies_are_read_whole(
    pools: list[Http1Pool],
) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")

    async def until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nto the end")
        await writer.drain()

    async with Server(answering(chunked)) as port:
        pool = Http1Pool("127.0.0.1", port)
        pools.append(pool)
        response = await pool.request("POST", "/v1/x", b"{}")
        assert [part async for part in response.chunks()] in ([b"abc", b"de"], [b"abcde"])
        assert response.finished
        response.release()
        assert pool.idle_connections == 1
    async with Server(until_eof) as port:
        pool = Http1Pool("127.0.0.1", port)
        pools.append(pool)
        assert await fetch(pool) == (200, b"to the end")


async def test_an_answer_over_the_limit_is_refused_and_its_connection_closed(
    pools: list[Http1Pool],
) -> None:
    server = Server(answering(ok(b"x" * 5000)))
    async with server as port:
        pool = Http1Pool("127.0.0.1", port)
        pools.append(pool)
        response = await pool.request("POST", "/v1/x", b"{}")
        with pytest.raises(UpstreamError, match="over 1000 bytes"):
            await response.read(limit=1000)
        response.release()
        assert pool.idle_connections == 0
        await asyncio.wait_for(server.closed.wait(), 5)


async def test_an_answer_head_past_its_limit_is_refused_and_its_connection_closed(
    pools: list[Http1Pool],
) -> None:
    endless = b"".join(b"x-pad-%d: %s\r\n" % (i, b"v" * 1000) for i in range(80))  # ~80 KB
    server = Server(answering(ok(b"{}", endless)))
    async with server as port:
        pool = Http1Pool("127.0.0.1", port)
        pools.append(pool)
        with pytest.raises(UpstreamError, match="header lines exceed"):
            await fetch(pool)
        assert pool.idle_connections == 0
        await asyncio.wait_for(server.closed.wait(), 5)


async def test_broken_http_and_a_cut_connection_are_upstream_errors(
    pools: list[Http1Pool],
) -> None:
    async with Server(answering(b"NOT HTTP AT ALL\r\n\r\n")) as port:
        pool = Http1Pool("127.0.0.1", port)
        pools.append(pool)
        with pytest.raises(UpstreamError, match=r"not HTTP/1\.1"):
            await fetch(pool)

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly some")
        await writer.drain()

    async with Server(cut) as port:
        pool = Http1Pool("127.0.0.1", port)
        pools.append(pool)
        with pytest.raises(UpstreamError, match="closed the connection"):
            await fetch(pool)
        assert pool.idle_connections == 0


async def test_nobody_listening_is_a_connection_error(pools: list[Http1Pool]) -> None:
    async with Server(answering()) as port:
        pass  # the port is free again
    pool = Http1Pool("127.0.0.1", port)
    pools.append(pool)
    with pytest.raises(OSError):
        await fetch(pool)


async def test_a_request_abandoned_midway_closes_its_connection(pools: list[Http1Pool]) -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await reader.read()  # until the client goes

    server = Server(slow)
    async with server as port:
        pool = Http1Pool("127.0.0.1", port)
        pools.append(pool)
        response = await pool.request("POST", "/v1/x", b"{}")
        parts = response.chunks()
        assert await anext(parts) == b"abc"
        waiting = asyncio.create_task(anext(parts))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        response.release()  # not read to its end: closed, not pooled
        assert pool.idle_connections == 0
        await asyncio.wait_for(server.closed.wait(), 5)  # the server saw its client go


async def test_a_burst_leaves_its_connections_for_the_next_burst_up_to_max_idle(
    pools: list[Http1Pool],
) -> None:
    """Every connection of a burst waits for the next one (the default keeps more than 32:
    a busy node's streams), and no more than ``max_idle`` of them."""
    burst = 48
    arrived, release = asyncio.Event(), asyncio.Event()
    waiting = 0

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal waiting
        while True:
            head, _ = await read_request(reader)
            if not head:
                return
            waiting += 1
            if waiting == burst:
                arrived.set()
            await release.wait()
            writer.write(ok(b"{}"))

    async def one_burst(pool: Http1Pool) -> None:
        nonlocal waiting
        waiting = 0
        arrived.clear()
        release.clear()
        tasks = [asyncio.create_task(fetch(pool)) for _ in range(burst)]
        await arrived.wait()  # all `burst` at once: each on a connection of its own
        release.set()
        assert await asyncio.gather(*tasks) == [(200, b"{}")] * burst

    server = Server(held)
    async with server as port:
        pool = Http1Pool("127.0.0.1", port)
        small = Http1Pool("127.0.0.1", port, max_idle=8)
        pools += [pool, small]
        await one_burst(pool)
        assert pool.idle_connections == burst
        await one_burst(pool)
        assert server.connections == burst  # the second burst opened none
        await one_burst(small)
        assert small.idle_connections == 8
        await one_burst(small)
    assert server.connections == 2 * burst + burst - 8


async def test_an_answer_given_back_soon_returns_after_the_callers_step(
    pools: list[Http1Pool], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`release_soon` (a whole answer, read): the connection goes back in a loop callback,
    after what the caller does in the same step (sends the answer on); at once when the
    pool needs a connection before that; closed if the pool closes first."""
    server = Server(answering(ok(b"{}"), ok(b"{}"), ok(b"{}"), ok(b"{}")))
    async with server as port:
        pool = Http1Pool("127.0.0.1", port)
        pools.append(pool)
        order: list[str] = []
        give_back = pool._give_back

        def noted(conn: _Connection) -> None:
            order.append("kept")
            give_back(conn)

        monkeypatch.setattr(pool, "_give_back", noted)

        async def answered() -> None:
            response = await pool.request("POST", "/v1/x", b"{}")
            assert await response.read() == b"{}"
            response.release_soon()
            order.append("sent on")  # the caller's own step goes on first

        await answered()
        await asyncio.sleep(0)
        assert order == ["sent on", "kept"]
        assert pool.idle_connections == 1
        await answered()  # the same connection
        assert await fetch(pool) == (200, b"{}")  # asked for before the callback: taken back
        assert server.connections == 1
        await answered()
        pool.close()  # before the callback: closed with the pool, not kept
        assert pool.idle_connections == 0
        await asyncio.wait_for(server.closed.wait(), 5)
        await asyncio.sleep(0)
        assert order == ["sent on", "kept", "sent on", "kept", "kept", "sent on", "kept"]
