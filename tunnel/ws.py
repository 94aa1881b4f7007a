"""Opening tunnels: `connect` (node) and `serve` (coordinator), on `wire.WsConnection`.

The Noise handshake rides in the HTTP upgrade (header ``X-Meshgate-Handshake``,
base64), so a node the coordinator refuses gets an HTTP 401/403 and no websocket
ever exists:

    node                                      coordinator
    GET / + header: message 1          ->     rate limit per source (no DH yet)
                                              read message 1 -> Hello
                                              ReplayGuard, then authorize(hello)
                                     <-       101 + header: message 2   (or 401/403 + reason)
    finish -> Session
    first frame: PING                  ->     only now is on_link(link) called

websockets' sans-I/O protocols (`ClientProtocol`, `ServerProtocol`) parse and check the
HTTP upgrade and every websocket frame; `wire.py` runs them on an asyncio.Protocol and
`link.py` puts the tunnel on top (no task per connection but the server's handler).
Liveness is the tunnel's own authenticated PING (`Link`); websockets' keepalive pings
are not used (a peer could answer those without its keys).

Errors leave as TunnelError subclasses only (RefusedError for 401/403).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus, InvalidURI
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from tunnel.constants import (
    HANDSHAKE_HEADER,
    MAX_HANDSHAKE_MESSAGE,
    MAX_MESSAGE,
    PING_TIMEOUT_S,
    QUIET_PING_S,
    RTT_PING_S,
)
from tunnel.errors import HandshakeError, RefusedError, TunnelError
from tunnel.handshake import Hello, InitiatorHandshake, ReplayGuard, ResponderHandshake
from tunnel.identity import Identity
from tunnel.link import CLOSE_PROTOCOL_ERROR, WRITE_HIGH_WATER, Link
from tunnel.ratelimit import IdentityLimiter, SourceLimiter
from tunnel.session import Session
from tunnel.timers import TIMER_GRAIN_S, TimerWheel
from tunnel.wire import WireClosed, WsConnection

log = logging.getLogger(__name__)

WS_MAX_SIZE = MAX_MESSAGE + 1024
CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001
OPEN_TIMEOUT_S = 10.0  # a client that sends no complete upgrade request within this is dropped


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
    ping_interval: float | None = None,
    ping_timeout: float | None = PING_TIMEOUT_S,
    ping_when_quiet: float | None = QUIET_PING_S,
) -> Link:
    """Open one tunnel (fresh ephemeral keys every call; the caller loops with `backoff`).

    The node's side of liveness (rules: `Connection.tick`): it sends an authenticated
    PING only after `ping_when_quiet` s of hearing nothing from the coordinator (which
    pings it every RTT_PING_S), and every `ping_interval` s if one is given; a PING
    unanswered for `ping_timeout` s closes the link (ClosedError, "no PONG"). So a
    coordinator that goes silent with the TCP connection open is dropped within
    `ping_when_quiet + ping_timeout` s (90 s by default) of the last frame heard.

    Raises RefusedError on 401/403 (final), TunnelError for anything else.
    """
    handshake = InitiatorHandshake(
        identity, coordinator_key, now_ms=(now_ms or _now_ms)(), enroll=enroll, info=info
    )
    ws, response = await _open(url, {HANDSHAKE_HEADER: _b64(handshake.first_message())},
                               open_timeout)
    try:
        reply = response.headers.get(HANDSHAKE_HEADER)
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
            ping_when_quiet=ping_when_quiet,
        )
        await link.ping()  # the first encrypted frame: proves our keys to the coordinator
    except BaseException:
        with contextlib.suppress(WireClosed):
            ws.start_close(CLOSE_POLICY, "handshake failed")
        raise
    link._start()
    return link


async def _open(
    url: str, header: dict[str, str], open_timeout: float
) -> tuple[WsConnection, Response]:
    try:
        uri = parse_uri(url)
    except InvalidURI as exc:
        raise TunnelError(f"cannot open the tunnel to {url}: {exc}") from None
    protocol = ClientProtocol(uri, max_size=WS_MAX_SIZE)
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context() if uri.secure else None
    ws: WsConnection | None = None
    try:
        async with asyncio.timeout(open_timeout):
            _, ws = await loop.create_connection(
                lambda: WsConnection(protocol), uri.host, uri.port, ssl=context,
                server_hostname=uri.host if context else None,
            )
            request = protocol.connect()
            for name, value in header.items():
                request.headers[name] = value
            protocol.send_request(request)
            ws.write_pending()
            response = await ws.handshake
    except (OSError, TimeoutError, WireClosed) as exc:
        if ws is not None:
            ws.abort()
        raise TunnelError(f"cannot open the tunnel to {url}: {exc or type(exc).__name__}") from None
    failure = protocol.handshake_exc
    if failure is None and isinstance(response, Response):
        return ws, response
    ws.abort()
    if isinstance(failure, InvalidStatus):
        status = failure.response.status_code
        body = (failure.response.body or b"").decode("utf-8", "replace").strip()
        if status in (401, 403):
            raise RefusedError(status, body or "refused")
        raise TunnelError(f"coordinator answered HTTP {status}: {body}")
    raise TunnelError(f"cannot open the tunnel to {url}: {failure}")


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

    async def process_request(  # noqa: PLR0911  (one return per HTTP answer)
        self, protocol: ServerProtocol, source: str, request: Request
    ) -> Response | tuple[Session, Hello, str]:
        """The refusal to send, or the session, the hello and the reply header."""
        now = time.monotonic()
        past_limit = not self.limiter.allow(source, now)
        if past_limit and (self.known is None or not self.overflow.may_try(now)):
            return protocol.reject(429, "too many handshakes from this address; slow down\n")
        header = request.headers.get(HANDSHAKE_HEADER)
        if header is None:
            return protocol.reject(400, f"missing {HANDSHAKE_HEADER} header: not a meshgate node\n")
        responder = ResponderHandshake(self.static_key)
        try:
            hello = responder.read_first(_unb64(header))
        except HandshakeError as exc:
            log.warning("handshake from %s failed: %s", source, exc)
            return protocol.reject(401, f"{exc}\n")
        if past_limit and not (self.known is not None and self.known(hello.did)
                               and self.overflow.allow(hello.did, now)):
            return protocol.reject(429, "too many handshakes from this address; slow down\n")
        try:
            self.guard.check(hello.did, hello.timestamp_ms, self.now_ms())
        except HandshakeError as exc:
            log.warning("handshake of %s from %s refused: %s", hello.did, source, exc)
            return protocol.reject(403, f"{exc}\n")
        try:
            accept = await self.authorize(hello, source)
        except RefusedError as exc:
            return protocol.reject(exc.status, f"{exc.reason}\n")
        message, session = responder.accept(accept)
        return session, hello, _b64(message)


def _host(address: Any) -> str:
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)


class TunnelServer:
    """The listening socket and the connections it accepted (`sockets`, `close`,
    `wait_closed`, as asyncio's and websockets' servers)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.connections: set[WsConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self.server.sockets) if self.server is not None else ()

    def close(self) -> None:
        """Stop listening and close every connection (1001, going away)."""
        if self.server is not None:
            self.server.close()
        for ws in list(self.connections):
            with contextlib.suppress(WireClosed):
                ws.start_close(CLOSE_GOING_AWAY, "server shutting down")

    async def wait_closed(self) -> None:
        """Until every connection's handler returned (a few seconds, then they are
        cancelled)."""
        if self.tasks:
            _, late = await asyncio.wait(set(self.tasks), timeout=OPEN_TIMEOUT_S)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        for ws in list(self.connections):
            ws.abort()


async def _upgrade(gate: _Gate, ws: WsConnection) -> tuple[Session, Hello] | None:
    """The HTTP upgrade of one connection: its answer sent; the session if that was 101."""
    try:
        async with asyncio.timeout(OPEN_TIMEOUT_S):
            request = await ws.handshake
    except (TimeoutError, WireClosed):
        ws.abort()
        return None
    protocol = ws.protocol
    assert isinstance(protocol, ServerProtocol)
    assert isinstance(request, Request)
    if protocol.handshake_exc is not None:  # not HTTP, or too large: answered already
        return None
    try:
        answer = await gate.process_request(protocol, _host(ws.remote_address), request)
    except Exception:
        log.exception("tunnel handshake failed")
        answer = protocol.reject(500, "internal error\n")
    if isinstance(answer, Response):
        protocol.send_response(answer)
        ws.write_pending()
        return None
    session, hello, reply = answer
    response = protocol.accept(request)  # the upgrade's own checks (400/426 if bad)
    if response.status_code == 101:
        response.headers[HANDSHAKE_HEADER] = reply
    protocol.send_response(response)
    ws.write_pending()
    return (session, hello) if response.status_code == 101 else None


async def serve(
    host: str,
    port: int,
    static_key: X25519PrivateKey,
    authorize: Authorize,
    on_link: OnLink,
    *,
    ping_interval: float | None = RTT_PING_S,
    ping_timeout: float | None = PING_TIMEOUT_S,
    ping_when_quiet: float | None = None,
    first_frame_timeout: float = 10.0,
    handshake_rate: float = 20.0,
    handshake_burst: float = 40.0,
    replay_guard: ReplayGuard | None = None,
    now_ms: Callable[[], int] | None = None,
    known: Callable[[str], bool] | None = None,
) -> TunnelServer:
    """Listen for nodes. `on_link` runs for each connection's lifetime, only after the
    node's first encrypted frame arrived; the Link is closed when it returns.
    Liveness (rules: `Connection.tick`): a PING to each node at once, then every
    `ping_interval` s at a phase drawn per link, whatever the node sends (its RTT, and
    the node's proof that the coordinator lives), and after
    `ping_when_quiet` s of silence if given; a PING unanswered for `ping_timeout` s drops
    the link, so a silent node is dropped within `ping_interval + ping_timeout` s (80 s
    by default), plus the grain of the links' shared timer wheel (tunnel/timers.py: a
    tenth of the shortest of the three at most, TIMER_GRAIN_S = 0.25 s by default).
    `known(did)`: an identity that may handshake past its address's rate limit (see
    `IdentityLimiter`)."""
    gate = _Gate(
        static_key,
        authorize,
        limiter=SourceLimiter(handshake_rate, handshake_burst),
        guard=replay_guard or ReplayGuard(),
        now_ms=now_ms or _now_ms,
        known=known,
    )
    server = TunnelServer()
    # every link's ping deadlines on one wheel: a loop timer a tick, not one per link
    spans = [s for s in (ping_interval, ping_timeout, ping_when_quiet) if s]
    timers = TimerWheel(min([TIMER_GRAIN_S, *(span / 10 for span in spans)]))

    async def handle(ws: WsConnection) -> None:
        upgraded = await _upgrade(gate, ws)
        if upgraded is None:
            return
        session, hello = upgraded
        link = Link(ws, session, initiator=False, hello=hello, ping_interval=ping_interval,
                    ping_timeout=ping_timeout, ping_when_quiet=ping_when_quiet, timers=timers)
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
        except Exception:  # the caller's bug: logged here, as websockets' server did
            log.exception("tunnel connection handler failed")
        finally:
            await link.close()

    def accepted() -> WsConnection:
        ws = WsConnection(ServerProtocol(max_size=WS_MAX_SIZE))
        server.connections.add(ws)
        ws.lost.add_done_callback(lambda _: server.connections.discard(ws))
        task = asyncio.get_running_loop().create_task(handle(ws))
        server.tasks.add(task)
        task.add_done_callback(server.tasks.discard)
        return ws

    server.server = await asyncio.get_running_loop().create_server(accepted, host, port)
    return server


__all__ = ["CLOSE_PROTOCOL_ERROR", "WRITE_HIGH_WATER", "Link", "TunnelServer", "connect", "serve"]
