"""A node Mux and a coordinator Mux on one real loopback tunnel, optionally through a
FaultProxy (tests/faultproxy.py) so the wire between them can be broken."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.faultproxy import FaultProxy
from tunnel import Hello, Identity, Link, Mux, TunnelServer, connect, serve
from tunnel.mux import OnControl, OnStream
from tunnel.noise import public_bytes


@dataclass
class Pair:
    node_link: Link
    coord_link: Link
    node_mux: Mux
    coord_mux: Mux
    node_run: asyncio.Task[None]
    coord_run: asyncio.Task[None]
    server: TunnelServer
    proxy: FaultProxy | None
    node_control: list[Any] = field(default_factory=list)

    async def close(self) -> None:
        await self.node_link.close()
        await self.coord_link.close()
        for task in (self.node_run, self.coord_run):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        if self.proxy is not None:
            await self.proxy.stop()
        self.server.close()
        await self.server.wait_closed()


async def mux_pair(
    *,
    via_proxy: bool = False,
    node_on_stream: OnStream | None = None,
    coord_on_stream: OnStream | None = None,
    node_on_control: OnControl | None = None,
    coord_on_control: OnControl | None = None,
    ping_interval: float | None = None,
    ping_timeout: float | None = None,
    node_pings: dict[str, float | None] | None = None,
    node_mux: dict[str, Any] | None = None,
    coord_mux: dict[str, Any] | None = None,
) -> Pair:
    key = X25519PrivateKey.generate()
    links: asyncio.Queue[Link] = asyncio.Queue()

    async def authorize(hello: Hello, remote: str) -> dict[str, Any]:
        return {"did": hello.did}

    async def on_link(link: Link) -> None:
        await links.put(link)
        await link.wait_closed()

    server = await serve(
        "127.0.0.1",
        0,
        key,
        authorize,
        on_link,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
    )
    port = next(iter(server.sockets)).getsockname()[1]
    proxy = None
    if via_proxy:
        proxy = FaultProxy("127.0.0.1", port)
        port = await proxy.start()
    node_link = await connect(
        f"ws://127.0.0.1:{port}",
        Identity.generate(),
        public_bytes(key),
        **(node_pings or {"ping_interval": ping_interval, "ping_timeout": ping_timeout,
                          "ping_when_quiet": None}),
    )
    coord_link = await asyncio.wait_for(links.get(), 10)
    nmux = Mux(
        node_link,
        initiator=True,
        on_stream=node_on_stream,
        on_control=node_on_control,
        **(node_mux or {}),
    )
    cmux = Mux(
        coord_link,
        initiator=False,
        on_stream=coord_on_stream,
        on_control=coord_on_control,
        **(coord_mux or {}),
    )
    return Pair(
        node_link,
        coord_link,
        nmux,
        cmux,
        asyncio.create_task(nmux.run()),
        asyncio.create_task(cmux.run()),
        server,
        proxy,
    )
