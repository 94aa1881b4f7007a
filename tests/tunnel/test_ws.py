"""The asyncio link over real loopback websockets (127.0.0.1, port 0): handshake,
refusals, rate limits, pings, close, concurrent senders, uvloop."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from tests.tunnel.ws_harness import (
    Coordinator,
    _connected,
    _now_ms,
    coordinator,
)
from tunnel import (
    ClosedError,
    Frame,
    FrameType,
    Identity,
    RefusedError,
    TunnelError,
    connect,
    serve,
)
from tunnel.constants import HANDSHAKE_HEADER
from tunnel.handshake import InitiatorHandshake
from tunnel.noise import public_bytes

__all__ = ["coordinator"]  # the fixture, used by name below


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
