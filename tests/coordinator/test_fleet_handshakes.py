"""A site of many nodes behind one address reconnects at once: known identities are
admitted past the per-address handshake limit; strangers are not."""

from __future__ import annotations

import asyncio
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tunnel import Hello, Identity, Link, RefusedError, TunnelError, connect, serve
from tunnel.noise import public_bytes

NODES = 60


async def test_known_identities_behind_one_address_all_get_in_and_strangers_do_not() -> None:
    key = X25519PrivateKey.generate()
    site = [Identity.generate() for _ in range(NODES)]
    known = {i.did for i in site}

    async def authorize(hello: Hello, remote: str) -> dict[str, Any]:
        if hello.did not in known:
            raise RefusedError(403, "unknown node")
        return {"did": hello.did, "enrolled": False, "labels": {}}

    async def on_link(link: Link) -> None:
        await link.wait_closed()

    # 2 handshakes per address, then 1 a minute: 60 nodes could never get in on it alone
    server = await serve("127.0.0.1", 0, key, authorize, on_link, handshake_rate=1 / 60,
                         handshake_burst=2, known=known.__contains__)
    url = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"
    try:
        links = await asyncio.gather(*(connect(url, i, public_bytes(key)) for i in site))
        assert len(links) == NODES  # every one at the first attempt, none refused
        refused: list[str] = []
        try:
            await connect(url, Identity.generate(), public_bytes(key))
        except TunnelError as exc:
            refused.append(str(exc))
        assert len(refused) == 1
        assert "429" in refused[0]
        # one identity cannot spend the site's allowance by reconnecting in a loop
        again: list[str] = []
        for _ in range(4):
            try:
                link = await connect(url, site[0], public_bytes(key))
                await link.close()
            except TunnelError as exc:
                again.append(str(exc))
        assert again
        assert all("429" in e for e in again)
        for link in links:
            await link.close()
    finally:
        server.close()
        await server.wait_closed()
