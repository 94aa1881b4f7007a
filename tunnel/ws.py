"""The thin asyncio layer: the sans-I/O core on a `websockets` connection.

The only module of `tunnel` that imports websockets. The Noise handshake rides
in the HTTP upgrade (header ``X-Meshgate-Handshake``, base64), so a node the
coordinator refuses gets an HTTP 401/403 and no websocket ever exists:

    node                                      coordinator
    GET / + header: message 1          ->     rate limit per source (no DH yet)
                                              read message 1 -> Hello
                                              ReplayGuard, then authorize(hello)
                                     <-       101 + header: message 2   (or 401/403 + reason)
    finish -> Session
    first frame: PING                  ->     only now is on_link(link) called

Errors leave as TunnelError subclasses only (RefusedError for 401/403).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.http11 import Request, Response

from tunnel.connection import Connection as TunnelConnection
from tunnel.connection import Event, Opened, Pong, Received
from tunnel.constants import HANDSHAKE_HEADER, MAX_HANDSHAKE_MESSAGE, MAX_MESSAGE
from tunnel.errors import ClosedError, FrameError, HandshakeError, RefusedError, TunnelError
from tunnel.frames import Frame, FrameType
from tunnel.handshake import Hello, InitiatorHandshake, ReplayGuard, ResponderHandshake
from tunnel.identity import Identity
from tunnel.ratelimit import IdentityLimiter, SourceLimiter
from tunnel.session import Session

log = logging.getLogger(__name__)

WS_MAX_SIZE = MAX_MESSAGE + 1024
# Frames queued in the core past this many bytes make senders wait for the writer.
WRITE_HIGH_WATER = 256 * 1024
CLOSE_FLUSH_S = 5.0  # how long close() waits to send what is queued
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008


def _now_ms() -> int:
    return int(time.time() * 1000)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    if len(text) > 2 * MAX_HANDSHAKE_MESSAGE:
        raise HandshakeError("handshake header too long")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HandshakeError("handshake header is not base64") from None


class Link:
    """One established, authenticated tunnel connection; either side.

    A thin shell on the sans-I/O `Connection` (`link.conn`): one writer task writes
    whatever the core has to send (frames queued while it was writing leave together,
    in one message), one reader (`recv`, or a `Mux`) feeds it what arrives, a timer
    task pings. PING is answered, PONG measured and KEY_UPDATE applied in the core;
    none of them is returned by `recv`. `send` is safe from many tasks.
    """

    def __init__(
        self,
        ws: Connection,
        session: Session,
        *,
        initiator: bool = False,
        hello: Hello | None = None,
        accept: dict[str, Any] | None = None,
        ping_interval: float | None = None,
        ping_timeout: float | None = None,
    ) -> None:
        self._ws = ws
        self._session = session
        self.conn = TunnelConnection(
            session,
            initiator=initiator,
            now=time.monotonic(),
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
        )
        self.hello = hello
        self.accept = accept
        self._pongs: dict[int, asyncio.Future[None]] = {}
        self._recv_lock = asyncio.Lock()
        self._pending: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._kicks = 0  # rounds asked of the writer
        self._written = 0  # rounds it finished
        self._flushes: list[asyncio.Future[None]] = []
        self._writer: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None

    @property
    def rtt_ms(self) -> float | None:
        return self.conn.rtt_ms

    @property
    def rekey_after_messages(self) -> int:
        return self.conn.rekey_after_messages

    @rekey_after_messages.setter
    def rekey_after_messages(self, value: int) -> None:
        self.conn.rekey_after_messages = value

    @property
    def rekey_after_s(self) -> float:
        return self.conn.rekey_after_s

    @rekey_after_s.setter
    def rekey_after_s(self, value: float) -> None:
        self.conn.rekey_after_s = value

    @property
    def remote_address(self) -> Any:
        return self._ws.remote_address

    @property
    def closed(self) -> bool:
        return self.conn.closed is not None

    @property
    def closed_reason(self) -> str | None:
        """Why the link closed (None while it is open)."""
        return self.conn.closed

    def _start(self) -> None:
        if self.conn.ping_interval and self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_loop())

    # -- sending --------------------------------------------------------------

    async def send(self, frame: Frame) -> None:
        """Queue one frame (its seq is assigned by the session) and let the writer send
        it; waits while too much is queued (the socket is slow or stalled)."""
        self.conn.send_raw(frame)
        await self.sent()

    async def sent(self) -> None:
        """Wake the writer for what the core has queued; wait while over the high-water
        mark (backpressure: websockets' drain stops the writer, the writer stops us)."""
        self.kick()
        while self.conn.pending_bytes > WRITE_HIGH_WATER:
            if self.conn.closed is not None:
                raise ClosedError(f"link is closed: {self.conn.closed}")
            self._room.clear()
            await self._room.wait()

    def kick(self) -> None:
        """The core has something to send: the writer sends it on its next round (in
        this loop iteration's wake-ups: an idle link adds no delay)."""
        if self.conn.closed is not None:
            return
        self._kicks += 1
        self._wake.set()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop())

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                target = self._kicks
                messages = self.conn.data_to_send(time.monotonic())
                self._room.set()
                for message in messages:
                    await self._ws.send(message)  # waits while the write buffer is full
                self._written = target
                self._wake_flushes()
        except ConnectionClosed as exc:
            self._mark_closed(f"connection closed ({exc})")
        except FrameError as exc:  # the session died under us
            self._mark_closed(str(exc))

    def _wake_flushes(self) -> None:
        waiting, self._flushes = self._flushes, []
        for flush in waiting:
            if not flush.done():
                flush.set_result(None)

    async def flush(self) -> None:
        """Return once every frame queued so far was written (or the link closed)."""
        target = self._kicks
        while self._written < target and self.conn.closed is None:
            flush = asyncio.get_running_loop().create_future()
            self._flushes.append(flush)
            await flush

    async def _tick_loop(self) -> None:
        while self.conn.closed is None:
            deadline = self.conn.next_deadline()
            if deadline is None:
                return
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            reason = self.conn.tick(time.monotonic())
            if reason is not None:
                self.abort(reason)
                return
            self.kick()

    async def ping(self, *, wait: bool = False) -> None:
        """Send an authenticated app-level PING; `rtt_ms` is set when its PONG comes back.
        With `wait`, return only once the PONG arrived."""
        if self.conn.closed is not None:
            raise ClosedError(f"link is closed: {self.conn.closed}")
        stamp = self.conn.ping(time.monotonic())
        pong: asyncio.Future[None] | None = None
        if wait:
            pong = self._pongs[stamp] = asyncio.get_running_loop().create_future()
        try:
            await self.sent()
            await self.flush()
            if pong is not None:
                await pong
        finally:
            self._pongs.pop(stamp, None)

    # -- receiving ------------------------------------------------------------

    async def recv(self) -> Frame:
        """The next frame for the caller; ClosedError when the link is closed. (Without
        a Mux: DATA read here gives its credit back at once.)"""
        async with self._recv_lock:
            while True:
                while self._pending:
                    event = self._pending.popleft()
                    if isinstance(event, Received | Opened):
                        frame = event.frame
                        if frame.type == FrameType.DATA:
                            state = self.conn.streams.get(frame.stream_id)
                            if state is not None:
                                self.conn.consumed(state, len(frame.body))
                                self.kick()
                        return frame
                self._pending.extend(await self._read_events())

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[Frame]:
        while True:
            try:
                frame = await self.recv()
            except ClosedError:
                return
            yield frame

    async def _read_events(self) -> list[Event]:
        """Read one message and feed it to the core: its events (maybe none)."""
        while True:
            if self.conn.closed is not None:
                raise ClosedError(f"link is closed: {self.conn.closed}")
            try:
                message = await self._ws.recv()
            except ConnectionClosed as exc:
                self._mark_closed(f"connection closed ({exc})")
                continue
            if isinstance(message, str):
                await self._fail(CLOSE_PROTOCOL_ERROR, "text message on a binary tunnel")
            try:
                events = self.conn.receive(message, time.monotonic())
            except FrameError as exc:
                await self._fail(CLOSE_PROTOCOL_ERROR, str(exc))
            if self.conn.pending_bytes:
                self.kick()  # PONG, WINDOW, a refusal
            for event in events:
                if isinstance(event, Pong):
                    pong = self._pongs.pop(event.stamp, None)
                    if pong is not None and not pong.done():
                        pong.set_result(None)
            return events

    async def _fail(self, code: int, reason: str) -> NoReturn:
        log.warning("tunnel link closed: %s", reason)
        self.conn.session.dead = self.conn.session.dead or reason
        self._mark_closed(reason)
        with contextlib.suppress(ConnectionClosed):
            await self._ws.close(code, reason[:120])
        raise FrameError(reason)

    async def _first_frame(self) -> None:
        """Wait for the peer's first encrypted message (key confirmation), keeping what it
        carries for the caller."""
        async with self._recv_lock:
            self._pending.extend(await self._read_events())

    # -- closing --------------------------------------------------------------

    def _mark_closed(self, reason: str) -> None:
        if self.conn.closed is None:
            self.conn.closed = reason or "closed"
        current = asyncio.current_task()
        for task in (self._ticker, self._writer):
            if task is not None and task is not current:
                task.cancel()
        for pong in self._pongs.values():
            if not pong.done():
                pong.set_exception(ClosedError(f"link is closed: {self.conn.closed}"))
        self._pongs.clear()
        self._room.set()
        self._wake_flushes()

    def abort(self, reason: str) -> None:
        """Drop the connection at once, without a closing handshake (the path is dead or
        stalled, so none could complete): a reader's `recv` raises ClosedError(reason)."""
        self._mark_closed(reason)
        transport = getattr(self._ws, "transport", None)
        if transport is not None:
            transport.abort()

    async def fail(self, reason: str) -> NoReturn:
        """The peer broke the protocol above the session: close with 1002 and raise
        FrameError(reason)."""
        await self._fail(CLOSE_PROTOCOL_ERROR, reason)

    async def close(self, reason: str = "") -> None:
        """Send what is queued (a few seconds at most), then close the websocket."""
        if self.conn.closed is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), CLOSE_FLUSH_S)
        self._mark_closed(reason or "closed by this side")
        with contextlib.suppress(ConnectionClosed):
            await self._ws.close(1000, reason[:120])

    async def wait_closed(self) -> None:
        await self._ws.wait_closed()
        self._mark_closed("connection closed")


# -- client -----------------------------------------------------------------


async def connect(
    url: str,
    identity: Identity,
    coordinator_key: bytes,
    *,
    enroll: tuple[str, bytes] | None = None,
    info: dict[str, str | int] | None = None,
    open_timeout: float = 10.0,
    now_ms: Callable[[], int] | None = None,
    ping_interval: float | None = 15.0,
    ping_timeout: float | None = 20.0,
    ws_keepalive: bool = True,
) -> Link:
    """Open one tunnel (fresh ephemeral keys every call; the caller loops with `backoff`).

    Every `ping_interval` s the link sends an authenticated PING; no PONG within
    `ping_timeout` s closes it (ClosedError, "no PONG"). With `ws_keepalive`, websockets'
    own ping/pong runs too, on the same interval and timeout.

    Raises RefusedError on 401/403 (final), TunnelError for anything else.
    """
    handshake = InitiatorHandshake(
        identity, coordinator_key, now_ms=(now_ms or _now_ms)(), enroll=enroll, info=info
    )
    header = {HANDSHAKE_HEADER: _b64(handshake.first_message())}
    keepalive = (ping_interval, ping_timeout) if ws_keepalive else (None, None)
    ws = await _open(url, header, open_timeout, *keepalive)
    try:
        reply = ws.response.headers.get(HANDSHAKE_HEADER) if ws.response else None
        if reply is None:
            raise HandshakeError("the server answered without a handshake: not a meshgate tunnel")
        session, accept = handshake.finish(_unb64(reply))
        link = Link(
            ws,
            session,
            initiator=True,
            accept=accept,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
        )
        await link.ping()  # the first encrypted frame: proves our keys to the coordinator
    except BaseException:
        await ws.close(CLOSE_POLICY, "handshake failed")
        raise
    link._start()
    return link


async def _open(
    url: str,
    header: dict[str, str],
    open_timeout: float,
    ping_interval: float | None,
    ping_timeout: float | None,
) -> ClientConnection:
    try:
        return await ws_connect(
            url,
            additional_headers=header,
            compression=None,
            max_size=WS_MAX_SIZE,
            open_timeout=open_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        body = (exc.response.body or b"").decode("utf-8", "replace").strip()
        if status in (401, 403):
            raise RefusedError(status, body or "refused") from None
        raise TunnelError(f"coordinator answered HTTP {status}: {body}") from None
    except (OSError, TimeoutError, WebSocketException, ValueError) as exc:
        raise TunnelError(f"cannot open the tunnel to {url}: {exc or type(exc).__name__}") from None


# -- server -----------------------------------------------------------------

Authorize = Callable[[Hello, str], Awaitable[dict[str, Any]]]
OnLink = Callable[[Link], Awaitable[None]]


class _Gate:
    """What happens inside the HTTP upgrade, before any websocket exists."""

    def __init__(
        self,
        static_key: X25519PrivateKey,
        authorize: Authorize,
        *,
        limiter: SourceLimiter,
        guard: ReplayGuard,
        now_ms: Callable[[], int],
        known: Callable[[str], bool] | None = None,
    ) -> None:
        self.static_key = static_key
        self.authorize = authorize
        self.limiter = limiter
        self.known = known  # identities admitted past their address's limit
        self.overflow = IdentityLimiter()
        self.guard = guard
        self.now_ms = now_ms
        self.ready: weakref.WeakKeyDictionary[ServerConnection, tuple[Session, Hello, str]] = (
            weakref.WeakKeyDictionary()
        )

    async def process_request(  # noqa: PLR0911  (one return per HTTP answer)
        self, conn: ServerConnection, request: Request
    ) -> Response | None:
        source = _host(conn.remote_address)
        now = time.monotonic()
        past_limit = not self.limiter.allow(source, now)
        if past_limit and (self.known is None or not self.overflow.may_try(now)):
            return conn.respond(429, "too many handshakes from this address; slow down\n")
        header = request.headers.get(HANDSHAKE_HEADER)
        if header is None:
            return conn.respond(400, f"missing {HANDSHAKE_HEADER} header: not a meshgate node\n")
        responder = ResponderHandshake(self.static_key)
        try:
            hello = responder.read_first(_unb64(header))
        except HandshakeError as exc:
            log.warning("handshake from %s failed: %s", source, exc)
            return conn.respond(401, f"{exc}\n")
        if past_limit and not (self.known is not None and self.known(hello.did)
                               and self.overflow.allow(hello.did, now)):
            return conn.respond(429, "too many handshakes from this address; slow down\n")
        try:
            self.guard.check(hello.did, hello.timestamp_ms, self.now_ms())
        except HandshakeError as exc:
            log.warning("handshake of %s from %s refused: %s", hello.did, source, exc)
            return conn.respond(403, f"{exc}\n")
        try:
            accept = await self.authorize(hello, source)
        except RefusedError as exc:
            return conn.respond(exc.status, f"{exc.reason}\n")
        message, session = responder.accept(accept)
        self.ready[conn] = (session, hello, _b64(message))
        return None

    def process_response(
        self, conn: ServerConnection, _request: Request, response: Response
    ) -> Response | None:
        entry = self.ready.get(conn)
        if entry is not None and response.status_code == 101:
            response.headers[HANDSHAKE_HEADER] = entry[2]
        return None


def _host(address: Any) -> str:
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)


async def serve(
    host: str,
    port: int,
    static_key: X25519PrivateKey,
    authorize: Authorize,
    on_link: OnLink,
    *,
    ping_interval: float | None = 15.0,
    ping_timeout: float | None = 20.0,
    ws_keepalive: bool = True,
    first_frame_timeout: float = 10.0,
    handshake_rate: float = 20.0,
    handshake_burst: float = 40.0,
    replay_guard: ReplayGuard | None = None,
    now_ms: Callable[[], int] | None = None,
    known: Callable[[str], bool] | None = None,
) -> Server:
    """Listen for nodes. `on_link` runs for each connection's lifetime, only after the
    node's first encrypted frame arrived; the Link is closed when it returns.
    `ping_interval`, `ping_timeout`, `ws_keepalive`: as for `connect`. `known(did)`: an
    identity that may handshake past its address's rate limit (see `IdentityLimiter`)."""
    gate = _Gate(
        static_key,
        authorize,
        limiter=SourceLimiter(handshake_rate, handshake_burst),
        guard=replay_guard or ReplayGuard(),
        now_ms=now_ms or _now_ms,
        known=known,
    )

    async def handler(conn: ServerConnection) -> None:
        entry = gate.ready.pop(conn, None)
        if entry is None:
            await conn.close(CLOSE_POLICY, "no handshake")
            return
        session, hello, _ = entry
        link = Link(
            conn,
            session,
            initiator=False,
            hello=hello,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
        )
        try:
            async with asyncio.timeout(first_frame_timeout):
                await link._first_frame()
        except (TimeoutError, TunnelError) as exc:
            log.warning("node %s sent no valid first frame: %s", hello.did, exc)
            await link.close("no valid first frame")
            return
        link._start()
        try:
            await on_link(link)
        finally:
            await link.close()

    return await ws_serve(
        handler,
        host,
        port,
        process_request=gate.process_request,
        process_response=gate.process_response,
        compression=None,
        max_size=WS_MAX_SIZE,
        ping_interval=ping_interval if ws_keepalive else None,
        ping_timeout=ping_timeout if ws_keepalive else None,
        server_header=None,
    )


__all__ = ["Link", "connect", "serve"]
