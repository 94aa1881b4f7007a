"""A real coordinator API (the server's own wiring, `server._context`) on a real uvicorn,
a real SQLite store, and a paid cloud upstream that is a small real OpenAI-shaped HTTP
server counting what reaches it. No node is connected, so every request that runs
goes to the cloud: the counter says whether a request reached a backend at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coordinator.api import build_app
from coordinator.cloud import CloudClient
from coordinator.config import CoordinatorConfig, Upstream
from coordinator.dispatch import Dispatcher
from coordinator.gateway import Gateway
from coordinator.ledger_journal import JOURNAL_DIR, open_journal
from coordinator.registry import Registry
from coordinator.server import _context
from coordinator.state import ServeOptions
from coordinator.store import KeyScopes, Store
from meshgate.httpserver import HttpLimits, protocol_class
from tunnel import Frame, FrameType, Identity, Link, Mux, Stream, connect
from tunnel import serve as serve_tunnel
from tunnel.noise import public_bytes

MODEL = "gpt-x"
BROKEN = "broken"  # the upstream answers 500 for this one
PROMPT_TOKENS = 10
COMPLETION_TOKENS = 20
PRICE_COMPLETION_PER_1K = 1.0  # so one request costs 0.02


@dataclass
class FakeCloud:
    requests: list[dict[str, Any]] = field(default_factory=list)
    request_ids: list[str | None] = field(default_factory=list)

    def app(self) -> Starlette:
        async def chat(request: Request) -> Response:
            body = json.loads(await request.body())
            self.requests.append(body)
            self.request_ids.append(request.headers.get("x-request-id"))
            if body.get("model") == BROKEN:
                return JSONResponse(
                    {"error": {"message": "upstream on fire", "type": "x"}}, status_code=500
                )
            n = len(self.requests)
            return JSONResponse(
                {
                    "id": f"chatcmpl-{n}",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body.get("model"),
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": f"answer {n}"},
                        }
                    ],
                    "usage": {
                        "prompt_tokens": PROMPT_TOKENS,
                        "completion_tokens": COMPLETION_TOKENS,
                        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
                    },
                }
            )

        return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


LOCAL_MODEL = "local-m"


@dataclass
class TunnelNode:
    """A node on a real tunnel that answers every request with one canned completion."""

    did: str
    link: Link
    requests: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def on_stream(self, stream: Stream, frame: Frame) -> None:
        self.requests.append(frame.body)
        n = len(self.requests)
        body = {
            "id": f"node-{n}",
            "object": "chat.completion",
            "created": 1,
            "model": LOCAL_MODEL,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": f"local {n}"},
                }
            ],
        }
        await stream.send(FrameType.DATA, json.dumps(body).encode())
        await stream.send(FrameType.END, {"usage": {"prompt_tokens": 3, "completion_tokens": 2}})


class _Server(uvicorn.Server):
    """uvicorn's server with an event set once it listens (uvicorn has only a flag)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()


@contextlib.asynccontextmanager
async def served(app: Any, *, daemon: bool = False) -> AsyncIterator[str]:
    """`app` on a real uvicorn on a free port of 127.0.0.1; yields its base URL. With
    `daemon`, on the daemons' own HTTP protocol (meshgate/http_protocols.py), which answers
    the coordinator's hot routes below ASGI (meshgate/http_hot.py)."""
    protocol: Any = protocol_class(HttpLimits(), "httptools") if daemon else "auto"
    server = _Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=0, lifespan="off", log_level="warning",
            access_log=False, http=protocol,
        )
    )
    task = asyncio.create_task(server.serve())
    listening = asyncio.create_task(server.listening.wait())
    await asyncio.wait((task, listening), timeout=10, return_when=asyncio.FIRST_COMPLETED)
    listening.cancel()
    assert server.started, "uvicorn stopped at its start" if task.done() else "no start in 10 s"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@dataclass
class Coordinator:
    url: str
    store: Store
    cloud: FakeCloud
    ctx: Any
    http: httpx.AsyncClient
    tunnel_url: str = ""
    tunnel_key: bytes = b""
    nodes: list[TunnelNode] = field(default_factory=list)

    async def node(self, models: tuple[str, ...] = (LOCAL_MODEL,)) -> TunnelNode:
        """Enroll and connect a node serving `models`; returns once the registry has it."""
        identity = Identity.generate()
        token_id, secret = self.store.create_token(60, {}, time.time())
        self.store.redeem_token(token_id, secret, identity.did, time.time())
        link = await connect(self.tunnel_url, identity, self.tunnel_key)
        node = TunnelNode(identity.did, link)
        mux = Mux(link, initiator=True, on_stream=node.on_stream)
        node.task = asyncio.create_task(mux.run())
        await mux.send_control(FrameType.INVENTORY, {"models": list(models)})
        await mux.send_control(
            FrameType.TELEMETRY,
            {"runtime": {m: {"decode_tps": 50.0, "prefill_tps": 500.0} for m in models}},
        )
        deadline = time.monotonic() + 10
        while (conn := self.ctx.registry.get(identity.did)) is None or not conn.models:
            assert time.monotonic() < deadline, "node never registered"
            await asyncio.sleep(0.01)
        self.nodes.append(node)
        return node

    def key(self, name: str = "app", **scopes: Any) -> str:
        _, plaintext = self.store.create_key(name, time.time(), scopes=KeyScopes(**scopes))
        return plaintext

    async def chat(
        self,
        key: str,
        *,
        model: str = MODEL,
        content: str = "hi",
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        return await self.http.post(
            "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
        )

    async def settled(self) -> None:
        """Wait for the ledger writes the API does in the background."""
        pending = list(self.ctx._pending)
        if pending:
            await asyncio.gather(*pending)


@contextlib.asynccontextmanager
async def coordinator(tmp_path: Path, *, cache: bool = False) -> AsyncIterator[Coordinator]:
    fake = FakeCloud()
    store = Store(f"sqlite:///{tmp_path / 'coordinator.db'}")
    async with served(fake.app()) as cloud_url:
        upstream = Upstream(
            name="paid",
            base_url=cloud_url + "/v1",
            api_key="sk-upstream",
            models={MODEL: MODEL, BROKEN: BROKEN},
            price_per_1k_completion=PRICE_COMPLETION_PER_1K,
        )
        config = CoordinatorConfig(upstreams=(upstream,))
        clouds = {"paid": CloudClient(upstream)}
        registry = Registry(c.view() for c in clouds.values())
        dispatcher = Dispatcher(registry, config.dispatch, clouds)
        opts = ServeOptions(
            state_dir=tmp_path,
            api_host="127.0.0.1",
            api_port=0,
            tunnel_host="127.0.0.1",
            tunnel_port=0,
            advertise_url=None,
            log_level="info",
            cache=cache,
        )
        # journaled rows, as the server writes them (reads wait for them: `ledger_barrier`)
        ctx = _context(store, registry, config, dispatcher, opts,
                       journal=open_journal(tmp_path / JOURNAL_DIR))
        static = X25519PrivateKey.generate()
        gateway = Gateway(store, registry)
        tunnel = await serve_tunnel("127.0.0.1", 0, static, gateway.authorize, gateway.on_link)
        port = next(iter(tunnel.sockets)).getsockname()[1]
        coord: Coordinator | None = None
        try:
            async with (
                served(build_app(ctx), daemon=True) as url,
                httpx.AsyncClient(base_url=url, timeout=30) as http,
            ):
                coord = Coordinator(
                    url, store, fake, ctx, http, f"ws://127.0.0.1:{port}", public_bytes(static)
                )
                yield coord
                await coord.settled()
        finally:
            for node in coord.nodes if coord else []:
                await node.link.close()
                if node.task is not None:
                    with contextlib.suppress(Exception):
                        await node.task
            tunnel.close()
            await tunnel.wait_closed()
            for client in clouds.values():
                await client.aclose()
            await asyncio.to_thread(ctx.close)
            store.close()
