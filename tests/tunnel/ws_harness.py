"""The websocket tests' coordinator: a real tunnel server on 127.0.0.1 port 0 that
knows the nodes a test adds, and helpers to connect a node and pair two Muxes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tunnel import (
    Frame,
    FrameType,
    Hello,
    Identity,
    Link,
    Mux,
    RefusedError,
    Stream,
    TunnelServer,
    connect,
    serve,
)
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


async def _drain(stream: Stream) -> None:
    while True:
        await stream.recv()
