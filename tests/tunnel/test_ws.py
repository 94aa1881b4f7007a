"""The asyncio layer over real loopback websockets (127.0.0.1, port 0)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from tunnel import (
    ClosedError,
    Frame,
    FrameError,
    FrameType,
    Hello,
    Identity,
    Link,
    Mux,
    RefusedError,
    Stream,
    TunnelError,
    TunnelServer,
    connect,
    serve,
)
from tunnel.constants import HANDSHAKE_HEADER
from tunnel.handshake import InitiatorHandshake
from tunnel.noise import public_bytes


@dataclass
class Coordinator:
    key: X25519PrivateKey
    known: set[str] = field(default_factory=set)
    links: asyncio.Queue[Link] = field(default_factory=asyncio.Queue)
    hellos: list[Hello] = field(default_factory=list)
    keep: asyncio.Event = field(default_factory=asyncio.Event)
    server: TunnelServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = next(iter(self.server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    @property
    def public(self) -> bytes:
        return public_bytes(self.key)

    async def authorize(self, hello: Hello, remote: str) -> dict[str, Any]:
        self.hellos.append(hello)
        if hello.did not in self.known:
            raise RefusedError(403, f"unknown node {hello.did}")
        return {"did": hello.did, "remote": remote}

    async def on_link(self, link: Link) -> None:
        await self.links.put(link)
        await link.wait_closed()


@pytest.fixture
async def coordinator() -> AsyncIterator[Coordinator]:
    coord = Coordinator(X25519PrivateKey.generate())
    coord.server = await serve("127.0.0.1", 0, coord.key, coord.authorize, coord.on_link)
    yield coord
    coord.server.close()
    await coord.server.wait_closed()


async def _connected(coord: Coordinator, **kwargs: Any) -> tuple[Identity, Link, Link]:
    node = Identity.generate()
    coord.known.add(node.did)
    client = await connect(coord.url, node, coord.public, **kwargs)
    server_side = await asyncio.wait_for(coord.links.get(), 5)
    return node, client, server_side


async def test_handshake_gives_each_side_its_view(coordinator: Coordinator) -> None:
    node, client, server_side = await _connected(coordinator, info={"host": "box"})
    assert client.accept == {"did": node.did, "remote": "127.0.0.1"}
    assert server_side.hello is not None
    assert server_side.hello.did == node.did
    assert server_side.hello.info == {"host": "box"}
    await client.send(Frame(FrameType.TELEMETRY, 0, 0, 0, {"cpu": 3}))
    frame = await asyncio.wait_for(server_side.recv(), 5)
    assert (frame.type, frame.body, frame.seq) == (FrameType.TELEMETRY, {"cpu": 3}, 1)
    await client.close()


async def test_unknown_node_is_refused_with_403_and_no_websocket(
    coordinator: Coordinator,
) -> None:
    stranger = Identity.generate()
    with pytest.raises(RefusedError) as refused:
        await connect(coordinator.url, stranger, coordinator.public)
    assert refused.value.status == 403
    assert refused.value.reason == f"unknown node {stranger.did}"
    assert coordinator.links.empty()


async def test_wrong_coordinator_key_fails_on_connect(coordinator: Coordinator) -> None:
    node = Identity.generate()
    coordinator.known.add(node.did)
    wrong = public_bytes(X25519PrivateKey.generate())
    with pytest.raises(RefusedError) as refused:
        await connect(coordinator.url, node, wrong)
    assert refused.value.status == 401
    assert "coordinator key" in refused.value.reason
    assert coordinator.hellos == []  # refused before authorize ran


async def test_impostor_coordinator_is_detected_by_the_node() -> None:
    real, impostor = X25519PrivateKey.generate(), Coordinator(X25519PrivateKey.generate())
    node = Identity.generate()
    impostor.known.add(node.did)
    impostor.server = await serve(
        "127.0.0.1", 0, impostor.key, impostor.authorize, impostor.on_link
    )
    try:
        with pytest.raises(TunnelError):
            await connect(impostor.url, node, public_bytes(real))
    finally:
        impostor.server.close()
        await impostor.server.wait_closed()


async def test_replayed_upgrade_is_refused(coordinator: Coordinator) -> None:
    node = Identity.generate()
    coordinator.known.add(node.did)
    msg1 = InitiatorHandshake(node, coordinator.public, now_ms=_now_ms()).first_message()
    headers = {HANDSHAKE_HEADER: base64.b64encode(msg1).decode()}
    first = await ws_connect(coordinator.url, additional_headers=headers, compression=None)
    with pytest.raises(InvalidStatus) as replay:
        await ws_connect(coordinator.url, additional_headers=headers, compression=None)
    assert replay.value.response.status_code == 403
    assert b"replayed" in (replay.value.response.body or b"")
    await first.close()


async def test_upgrade_without_handshake_header_is_a_400(coordinator: Coordinator) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await ws_connect(coordinator.url)
    assert refused.value.response.status_code == 400


async def test_nothing_listening_is_a_tunnel_error() -> None:
    with pytest.raises(TunnelError):
        await connect("ws://127.0.0.1:9", Identity.generate(), bytes(32), open_timeout=2)


async def test_handshakes_are_rate_limited_per_source() -> None:
    coord = Coordinator(X25519PrivateKey.generate())
    coord.server = await serve(
        "127.0.0.1",
        0,
        coord.key,
        coord.authorize,
        coord.on_link,
        handshake_rate=0.001,
        handshake_burst=2,
    )
    try:
        statuses = []
        for _ in range(3):
            try:
                await connect(coord.url, Identity.generate(), coord.public)
            except RefusedError as exc:
                statuses.append(exc.status)
            except TunnelError as exc:
                statuses.append(429 if "429" in str(exc) else 0)
        assert statuses == [403, 403, 429]
    finally:
        coord.server.close()
        await coord.server.wait_closed()


async def test_server_waits_for_the_first_frame_before_on_link() -> None:
    coord = Coordinator(X25519PrivateKey.generate())
    coord.server = await serve(
        "127.0.0.1", 0, coord.key, coord.authorize, coord.on_link, first_frame_timeout=0.3
    )
    node = Identity.generate()
    coord.known.add(node.did)
    try:
        msg1 = InitiatorHandshake(node, coord.public, now_ms=_now_ms()).first_message()
        headers = {HANDSHAKE_HEADER: base64.b64encode(msg1).decode()}
        silent = await ws_connect(coord.url, additional_headers=headers, compression=None)
        await asyncio.wait_for(silent.wait_closed(), 5)
        assert coord.links.empty()
    finally:
        coord.server.close()
        await coord.server.wait_closed()


async def test_ping_measures_rtt_and_is_not_returned_by_recv(coordinator: Coordinator) -> None:
    _, client, server_side = await _connected(coordinator)
    await client.ping()
    await client.send(Frame(FrameType.INVENTORY, 0, 0, 0, {"models": []}))
    frame = await asyncio.wait_for(server_side.recv(), 5)  # answers the PING on the way
    assert frame.type == FrameType.INVENTORY
    await server_side.send(Frame(FrameType.COMMAND, 0, 0, 0, {"load": "m"}))
    frame = await asyncio.wait_for(client.recv(), 5)  # takes the PONG on the way
    assert frame.type == FrameType.COMMAND
    assert client.rtt_ms is not None
    assert client.rtt_ms >= 0
    await client.close()


async def test_close_makes_recv_raise_closed_error(coordinator: Coordinator) -> None:
    _, client, server_side = await _connected(coordinator)
    await client.close("bye")
    with pytest.raises(ClosedError):
        await asyncio.wait_for(server_side.recv(), 5)
    with pytest.raises(ClosedError):
        await client.send(Frame(FrameType.PING, 0, 0, 0, {"t": 1}))
    assert [f async for f in client] == []


async def test_concurrent_senders_are_serialized(coordinator: Coordinator) -> None:
    _, client, server_side = await _connected(coordinator)
    body = {"blob": "x" * 100}
    await asyncio.gather(
        *(client.send(Frame(FrameType.TELEMETRY, 0, 0, 0, body)) for _ in range(50))
    )
    seqs = [(await asyncio.wait_for(server_side.recv(), 5)).seq for _ in range(50)]
    # in order, none lost (the first seq follows the node's PING and its PONG to the
    # coordinator's first PING, which may have gone before or after)
    assert seqs[0] in (1, 2)
    assert seqs == list(range(seqs[0], seqs[0] + 50))
    await client.close()


# -- mux --------------------------------------------------------------------


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


async def _echo(stream: Stream, frame: Frame) -> None:
    """A node-side handler: echo the OPEN body back as DATA chunks, then END."""
    for index in range(frame.body["chunks"]):
        await stream.send(FrameType.DATA, f"{frame.body['tag']}-{index}".encode())
        await asyncio.sleep(0)
    await stream.send(FrameType.END, {"n": frame.body["chunks"]})


async def _mux_pair(
    coordinator: Coordinator,
    on_stream: Callable[[Stream, Frame], Awaitable[None]] = _echo,
    on_control: Callable[[Frame], Awaitable[None]] | None = None,
) -> tuple[Link, Link, Mux, Mux, list[asyncio.Task[None]]]:
    _, client, server_side = await _connected(coordinator)
    node_mux = Mux(client, initiator=True, on_stream=on_stream)
    coord_mux = Mux(server_side, initiator=False, on_control=on_control)
    tasks = [asyncio.create_task(node_mux.run()), asyncio.create_task(coord_mux.run())]
    return client, server_side, node_mux, coord_mux, tasks


async def test_several_concurrent_streams_each_get_their_own_frames(
    coordinator: Coordinator,
) -> None:
    client, _, _, coord_mux, tasks = await _mux_pair(coordinator)

    async def request(tag: str, chunks: int) -> list[bytes]:
        stream = await coord_mux.open({"tag": tag, "chunks": chunks})
        assert stream.id % 2 == 0
        got = [frame async for frame in stream]
        assert got[-1].type == FrameType.END
        assert got[-1].body == {"n": chunks}
        return [f.body for f in got[:-1]]

    results = await asyncio.wait_for(
        asyncio.gather(*(request(f"r{n}", 5 + n) for n in range(8))), 10
    )
    for n, chunks in enumerate(results):
        assert chunks == [f"r{n}-{i}".encode() for i in range(5 + n)]
    assert coord_mux.open_streams == 0
    await client.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_control_frames_reach_on_control_in_order(coordinator: Coordinator) -> None:
    seen: list[int] = []
    done = asyncio.Event()

    async def on_control(frame: Frame) -> None:
        seen.append(frame.body["n"])
        if len(seen) == 20:
            done.set()

    client, _, node_mux, _, tasks = await _mux_pair(coordinator, on_control=on_control)
    for n in range(20):
        await node_mux.send_control(FrameType.TELEMETRY, {"n": n})
    await asyncio.wait_for(done.wait(), 5)
    assert seen == list(range(20))
    await client.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_link_close_makes_stream_recv_raise_closed_error(
    coordinator: Coordinator,
) -> None:
    started = asyncio.Event()

    async def hang(stream: Stream, frame: Frame) -> None:
        await stream.send(FrameType.DATA, b"first")
        started.set()
        await asyncio.sleep(3600)

    client, _, _, coord_mux, tasks = await _mux_pair(coordinator, on_stream=hang)
    stream = await coord_mux.open({})
    assert (await asyncio.wait_for(stream.recv(), 5)).body == b"first"
    await asyncio.wait_for(started.wait(), 5)
    await client.close()
    with pytest.raises(ClosedError):
        await asyncio.wait_for(stream.recv(), 5)
    with pytest.raises(ClosedError):
        await stream.send(FrameType.CANCEL, None)
    assert stream.closed
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_cancel_reaches_the_node_and_ends_the_stream(coordinator: Coordinator) -> None:
    cancelled = asyncio.Event()

    async def until_cancel(stream: Stream, frame: Frame) -> None:
        await stream.send(FrameType.DATA, b"tok")
        with contextlib.suppress(ClosedError):
            while (await stream.recv()).type != FrameType.CANCEL:
                pass
        cancelled.set()

    client, _, _, coord_mux, tasks = await _mux_pair(coordinator, on_stream=until_cancel)
    stream = await coord_mux.open({})
    await asyncio.wait_for(stream.recv(), 5)
    await stream.send(FrameType.CANCEL, None)
    await asyncio.wait_for(cancelled.wait(), 5)
    assert stream.closed
    assert coord_mux.open_streams == 0
    await client.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_a_stream_opened_with_the_wrong_parity_is_refused(coordinator: Coordinator) -> None:
    client, _, node_mux, coord_mux, tasks = await _mux_pair(coordinator)
    coord_mux.on_stream = None
    stream = await node_mux.open({"x": 1})
    frame = await asyncio.wait_for(stream.recv(), 5)
    assert frame.type == FrameType.ERROR
    await client.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_a_handler_that_forgets_end_sends_an_error(coordinator: Coordinator) -> None:
    async def forgetful(stream: Stream, frame: Frame) -> None:
        await stream.send(FrameType.DATA, b"x")

    client, _, _, coord_mux, tasks = await _mux_pair(coordinator, on_stream=forgetful)
    stream = await coord_mux.open({})
    frames = [f async for f in stream]
    assert [f.type for f in frames] == [FrameType.DATA, FrameType.ERROR]
    await client.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_link_rekeys_after_a_message_count_and_keeps_working(
    coordinator: Coordinator,
) -> None:
    _, client, server_side = await _connected(coordinator)
    client.rekey_after_messages = 3
    first_key = client._session._send._key
    for n in range(10):
        await client.send(Frame(FrameType.TELEMETRY, 0, 0, 0, {"n": n}))
    got = [(await asyncio.wait_for(server_side.recv(), 5)).body["n"] for _ in range(10)]
    assert got == list(range(10))  # KEY_UPDATE frames are absorbed by recv
    assert client._session._send._key != first_key
    assert client._session.sent_since_rekey < 3
    await client.close()


async def test_link_rekeys_after_an_age(coordinator: Coordinator) -> None:
    _, client, server_side = await _connected(coordinator)
    client.rekey_after_s = 0.0
    first_key = client._session._send._key
    await client.send(Frame(FrameType.TELEMETRY, 0, 0, 0, {"n": 1}))
    assert (await asyncio.wait_for(server_side.recv(), 5)).body == {"n": 1}
    # the frame and a KEY_UPDATE left under the old key (one message); the key changed
    assert client._session._send._key != first_key
    assert client._session.sent_since_rekey == 0
    await client.send(Frame(FrameType.TELEMETRY, 0, 0, 0, {"n": 2}))
    assert (await asyncio.wait_for(server_side.recv(), 5)).body == {"n": 2}
    await client.close()


async def test_garbage_on_the_wire_closes_the_link_with_a_protocol_error(
    coordinator: Coordinator,
) -> None:
    _, client, server_side = await _connected(coordinator)
    await client._ws.send(b"\x00" * 40)  # not a valid Noise transport message
    with pytest.raises(FrameError):
        await asyncio.wait_for(server_side.recv(), 5)
    with pytest.raises(ClosedError):
        await server_side.recv()
    await asyncio.wait_for(client._ws.wait_closed(), 5)
    assert client._ws.close_code == 1002


async def test_text_message_closes_the_link(coordinator: Coordinator) -> None:
    _, client, server_side = await _connected(coordinator)
    await client._ws.send("hello")
    with pytest.raises(FrameError, match="text"):
        await asyncio.wait_for(server_side.recv(), 5)


async def test_mux_run_raises_when_the_peer_breaks_the_protocol(
    coordinator: Coordinator,
) -> None:
    client, _, _, coord_mux, tasks = await _mux_pair(coordinator)
    stream = await coord_mux.open({"tag": "t", "chunks": 1000})
    await client._ws.send(b"\x01" * 64)
    with pytest.raises(FrameError):
        await asyncio.wait_for(tasks[1], 5)
    with pytest.raises(ClosedError):
        await asyncio.wait_for(_drain(stream), 5)
    await asyncio.wait_for(tasks[0], 5)


async def _drain(stream: Stream) -> None:
    while True:
        await stream.recv()


async def test_frames_queued_together_leave_in_one_message_and_an_idle_link_adds_no_wait(
    coordinator: Coordinator,
) -> None:
    _, client, server_side = await _connected(coordinator)
    session = client._session
    # idle: one frame goes out on its own, nothing waits for company
    before = session.sent_since_rekey
    await client.send(Frame(FrameType.TELEMETRY, 0, 0, 0, {"n": -1}))
    await client.flush()
    assert session.sent_since_rekey == before + 1
    assert (await asyncio.wait_for(server_side.recv(), 5)).body == {"n": -1}
    # 100 frames queued in one go (as 100 token streams would): a message or two
    before = session.sent_since_rekey
    await asyncio.gather(
        *(client.send(Frame(FrameType.TELEMETRY, 0, 0, 0, {"n": n})) for n in range(100))
    )
    await client.flush()
    assert session.sent_since_rekey - before <= 2
    got = [(await asyncio.wait_for(server_side.recv(), 5)).body["n"] for _ in range(100)]
    assert got == list(range(100))
    await client.close()


def test_the_tunnel_runs_on_uvloops_loop_too() -> None:
    """MESHGATE_LOOP=uvloop (meshgate/serving.py): uvloop's transports are not
    asyncio.Transport subclasses, and the shell must not care."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop is optional (not a dependency)")

    async def main() -> tuple[Any, Any]:
        coord = Coordinator(X25519PrivateKey.generate())
        coord.server = await serve("127.0.0.1", 0, coord.key, coord.authorize, coord.on_link)
        try:
            _, client, server_side = await _connected(coord)
            await client.send(Frame(FrameType.TELEMETRY, 0, 0, 0, {"cpu": 3}))
            frame = await asyncio.wait_for(server_side.recv(), 5)
            await client.close()
            return frame.body, server_side.remote_address[0]
        finally:
            coord.server.close()
            await coord.server.wait_closed()

    assert uvloop.run(main()) == ({"cpu": 3}, "127.0.0.1")
