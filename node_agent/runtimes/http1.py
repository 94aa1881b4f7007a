"""A small pooled HTTP/1.1 client for the node's hot path: one upstream, kept-alive connections.

:class:`Http1Pool` sends requests to one server (TCP host and port, or a unix
socket) over connections it keeps open between requests, and reads answers with
httptools' response parser (llhttp, in C: the parser uvicorn serves with, already a
dependency). It does only what :class:`~node_agent.runtimes.openai_http.OpenAIHttpRuntime`
needs on every request: a request with a whole body, then a status, headers and a
body read whole (bounded) or as it arrives (chunked or not). Measured on the node's
local port against an instant upstream (``scripts/bench/node_cpu.py``), it costs a
fraction of aiohttp's CPU per request: no cookie jar, tracing, redirects, URL
objects or per-request timer and task of its own.

Its bounds:

- a connection is opened within ``connect_timeout_s``; a pooled one idle for
  ``keepalive_s`` is closed before the server's own keep-alive could close it as
  we send on it (a POST is never resent);
- at most ``max_idle`` connections wait for the next request (`MAX_IDLE_CONNECTIONS`:
  as many as the streams a busy node has in flight at once, so that the next burst
  opens none; each one idle is a socket and a few KiB, and leaves after ``keepalive_s``):
  under 500 concurrent streams a pool of 32 had the node open ~470 connections a round,
  ~6-8% of its CPU (``scripts/bench/streams.py --profile``);
- an answer's header lines are refused past ``MAX_HEAD_BYTES``; an answer read
  whole is refused past ``max_body_bytes``; a streamed one is read
  with flow control (reading pauses while ``HIGH_WATER`` bytes wait for the reader);
- a connection goes back to the pool only once its answer was read to the end
  and the server did not ask to close it (a whole answer's in a loop callback,
  :meth:`Http1Response.release_soon`: after its caller sent it on); a request
  abandoned midway (the caller cancelled, an error, a stream left early) closes its
  connection, so the server sees the client leave, as a runner must to stop generating;
- every failure of the connection or of the server's HTTP is an ``OSError``
  (:class:`UpstreamError`), which the runtime maps to OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
import time
from collections import deque
from collections.abc import AsyncIterator

import httptools

from node_agent.runtimes.read_tick import READ_TICK, ReadTick

__all__ = ["Http1Pool", "Http1Response", "UpstreamError"]

#: Bytes of a streamed body held for a reader that is behind, before reading pauses.
HIGH_WATER = 256 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
#: Connections kept open for the next request, at most (see the module doc).
MAX_IDLE_CONNECTIONS = 512
#: Bytes of an answer's header lines past which it is refused (llhttp sets no limit).
MAX_HEAD_BYTES = 64 * 1024


class UpstreamError(ConnectionError):
    """The upstream's connection failed or it spoke broken HTTP."""


class _Connection(asyncio.Protocol):
    """One kept-alive connection; one request at a time; its parser's callbacks feed it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.head_done = False
        self.keep_alive = False  # the server did not ask to close (read with the head)
        self.done = False  # the answer's last byte came
        self.lost: BaseException | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.idle_since = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tick: ReadTick | None = None  # while a streamed answer is read: its reads
        self.tick_paused = False  # may be paced (`read_tick.py`); reading waits for the tick
        self.woken_at = float("-inf")  # when its reader was last woken under load

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            ours = exc.__context__  # a callback's own refusal (on_header's limit) says why
            self._fail(ours if isinstance(ours, UpstreamError)
                       else UpstreamError(f"the upstream's answer is not HTTP/1.1: {exc}"))
            if self.transport is not None:
                self.transport.close()
            return
        if self.chunks:  # the body pieces of this read (one a chunk of a chunked body: one
            # an SSE event of a streamed answer) wake the reader once, not once a piece
            if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()
            tick = self.tick
            if tick is not None and tick.paces():  # a node behind: a stream read
                loop = self.loop  # again within a tick of its last read is read no more
                assert loop is not None  # until the shared tick (what comes meanwhile
                now = loop.time()  # waits in the kernel: one read then, not one a piece)
                if (now - self.woken_at < tick.tick_s and not self.paused
                        and self.transport is not None):
                    self.tick_paused = True
                    self.transport.pause_reading()
                    tick.hold(self, loop, now)
                self.woken_at = now
            self._wake()  # what was read goes on at once

    def tick_resume(self) -> None:
        """The tick is due: read again."""
        if self.tick_paused:
            self.tick_paused = False
            if self.loop is not None:  # the tick counts as its last read: data that comes
                self.woken_at = self.loop.time()  # within a tick of it waits for the next
            transport = self.transport
            if not self.paused and transport is not None and not transport.is_closing():
                transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_done and not self.done and exc is None and not self._delimited():
            self.done = True  # a body that ends with the connection (neither length nor chunks)
        if not self.done:
            self._fail(UpstreamError(f"the upstream closed the connection: {exc or 'EOF'}"))
        self.lost = self.lost or UpstreamError("connection closed")
        self._wake()

    def _delimited(self) -> bool:
        return any(name.lower() in (b"content-length", b"transfer-encoding")
                   for name, _ in self.headers)

    # httptools' callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD_BYTES:  # raised through llhttp as HttpParserError
            raise UpstreamError(f"the upstream's header lines exceed {MAX_HEAD_BYTES} bytes")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:  # `data_received` wakes the reader after the read
        self.chunks.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        self.done = True
        self._wake()

    # ours
    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until the parser or the connection says something new."""
        self._raise_if_lost()
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None
        self._raise_if_lost()

    def _raise_if_lost(self) -> None:
        if self.lost is not None and not self.done:
            raise self.lost

    def take(self) -> bytes:
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            if not self.tick_paused:
                self.transport.resume_reading()
        return data

    def reuse(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers = []
        self.head_bytes = 0
        self.head_done = self.done = self.keep_alive = False
        self.woken_at = float("-inf")
        self.idle_since = time.monotonic()

    def usable(self, keepalive_s: float) -> bool:
        return (self.lost is None and self.transport is not None
                and not self.transport.is_closing()
                and time.monotonic() - self.idle_since < keepalive_s)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.lost = self.lost or UpstreamError("connection closed")


class Http1Response:
    """A status and headers; read the body with :meth:`read` or :meth:`chunks`, then
    :meth:`release` (always: back to the pool if read to its end, else closed)."""

    def __init__(self, pool: Http1Pool, conn: _Connection) -> None:
        self._pool, self._conn = pool, conn
        self._tick = pool.tick
        self._counted: ReadTick | None = None  # the tick this answer counts in (`chunks`)
        self.status = conn.status
        self.headers = conn.headers
        self._released = False

    async def read(self, limit: int = MAX_BODY_BYTES) -> bytes:
        """The whole body; an :class:`UpstreamError` past `limit` bytes."""
        conn, parts, size = self._conn, [], 0
        while True:
            if conn.chunks:
                data = conn.take()
                size += len(data)
                if size > limit:
                    self.close()
                    raise UpstreamError(f"the upstream's answer is over {limit} bytes")
                parts.append(data)
            if conn.done:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            await conn.wait()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunked transfer decoded); while the node
        reads many streams at once, a stream's reads may be paced by a shared tick
        (`read_tick.py`)."""
        conn = self._conn
        loop = asyncio.get_running_loop()
        tick = self._tick
        if tick is not None and tick.on and self._counted is None:
            conn.tick = self._counted = tick
            tick.opened(loop)
        try:
            while True:
                if conn.chunks:
                    yield conn.take()
                elif conn.done:
                    return
                else:  # `conn.wait()`, inline: a coroutine less to resume on every read
                    conn._raise_if_lost()
                    conn.waiter = loop.create_future()
                    try:
                        await conn.waiter
                    finally:
                        conn.waiter = None
                    if conn.lost is not None and not conn.done:
                        raise conn.lost
        finally:
            self._uncount()

    def _uncount(self) -> None:
        """No longer one of the streams its tick counts (once: the end of `chunks`, or the
        answer given back or closed, whichever comes first)."""
        tick, self._counted = self._counted, None
        if tick is not None:
            conn = self._conn
            conn.tick = None
            conn.tick_resume()
            tick.closed()

    @property
    def finished(self) -> bool:
        """Whether the body has been read to its end."""
        return self._conn.done and not self._conn.chunks

    def release(self) -> None:
        """Give the connection back (answer read to its end) or close it. Once."""
        if self._released:
            return
        self._released = True
        self._uncount()
        self._pool._give_back(self._conn)

    def release_soon(self) -> None:
        """`release`, in a loop callback: what the caller does next with the answer (send it
        on) comes first. The pool takes it back at once if it needs a connection sooner."""
        if self._released:
            return
        self._released = True
        self._uncount()
        self._pool._give_back_soon(self._conn)

    def close(self) -> None:
        """Close the connection, whatever is left unread."""
        if not self._released:
            self._released = True
            self._uncount()
            self._conn.close()


class Http1Pool:
    """Kept-alive HTTP/1.1 connections to one server (`host`:`port`, or the unix socket `uds`)."""

    def __init__(self, host: str, port: int, *, uds: str | None = None,
                 connect_timeout_s: float = 5.0, keepalive_s: float = 4.0,
                 max_idle: int = MAX_IDLE_CONNECTIONS,
                 headers: dict[str, str] | None = None,
                 ssl: ssl_module.SSLContext | None = None,
                 tick: ReadTick | None = READ_TICK) -> None:
        self.host, self.port, self.uds, self.ssl = host, port, uds, ssl
        self.tick = tick  # streamed reads gathered under load (`read_tick.py`); None: never
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.max_idle = max_idle
        authority = host if port in (80, 443) or uds else f"{host}:{port}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head_tail = f"Host: {authority}\r\n{extra}".encode("latin-1")
        self._idle: deque[_Connection] = deque()  # the oldest first
        self._returning: list[_Connection] = []  # given back, kept or closed in a callback
        self.closed = False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.uds is not None:
                    _, conn = await loop.create_unix_connection(_Connection, self.uds)
                else:
                    _, conn = await loop.create_connection(
                        _Connection, self.host, self.port, ssl=self.ssl,
                        server_hostname=self.host if self.ssl else None)
        except TimeoutError:
            raise UpstreamError(f"no connection within {self.connect_timeout_s} s") from None
        return conn

    def _pooled(self) -> _Connection | None:
        if self._returning:
            self._returned()
        while self._idle:
            conn = self._idle.pop()  # the newest: the least likely to be closed by the server
            if conn.usable(self.keepalive_s):
                return conn
            conn.close()
        return None

    async def request(self, method: str, target: str, body: bytes = b"",
                      content_type: str = "application/json") -> Http1Response:
        """Send one request; returns once the answer's status and headers came."""
        if self.closed:
            raise UpstreamError("the client is closed")
        conn = self._pooled() or await self._connect()
        head = (f"{method} {target} HTTP/1.1\r\n").encode("latin-1") + self._head_tail
        if body or method not in ("GET", "HEAD"):
            head += f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n".encode()
        assert conn.transport is not None
        conn.transport.write(head + b"\r\n" + body)
        try:
            while not conn.head_done:
                await conn.wait()
        except BaseException:
            conn.close()
            raise
        return Http1Response(self, conn)

    def _give_back_soon(self, conn: _Connection) -> None:
        if not self._returning:
            asyncio.get_running_loop().call_soon(self._returned)
        self._returning.append(conn)

    def _returned(self) -> None:
        returning, self._returning = self._returning, []
        for conn in returning:
            self._give_back(conn)

    def _give_back(self, conn: _Connection) -> None:
        idle = self._idle
        while idle and not idle[0].usable(self.keepalive_s):  # expired: closed, not kept
            idle.popleft().close()
        keep = (conn.done and not conn.chunks and not self.closed
                and conn.keep_alive and len(idle) < self.max_idle)
        if keep:
            conn.reuse()
            if conn.usable(self.keepalive_s):
                idle.append(conn)
                return
        conn.close()

    @property
    def idle_connections(self) -> int:
        """Connections kept open for the next request."""
        if self._returning:
            self._returned()
        return len(self._idle)

    def close(self) -> None:
        self.closed = True
        self._returned()  # closed, as the pool is
        for conn in self._idle:
            conn.close()
        self._idle.clear()
