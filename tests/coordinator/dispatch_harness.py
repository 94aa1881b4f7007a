"""The dispatch tests' fleet: the real Gateway and Registry on a real SQLite store, real
loopback websockets with the Noise handshake, and scripted nodes (`ScriptedNode`, a fake
of the node agent's request handling that speaks the real stream protocol) whose
behaviour each test chooses: answer, refuse, hang, drop the link before or after the
first chunk."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from coordinator.gateway import Gateway
from coordinator.registry import Registry
from coordinator.scheduler import Request
from coordinator.served import Served
from coordinator.store import Store
from meshgate.protocol import OpenRequest, error_body
from tunnel import Frame, FrameType, Identity, Link, Mux, Stream, connect, serve
from tunnel.noise import public_bytes

MODEL = "m"
Behaviour = Callable[["ScriptedNode", Stream, Frame], Awaitable[None]]


async def answer(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
    for i in range(3):
        await stream.send(FrameType.DATA, json.dumps({"i": i, "by": node.name}).encode())
    await stream.send(FrameType.END, {"usage": {"prompt_tokens": 5, "completion_tokens": 3}})


async def fail_500(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
    await stream.send(FrameType.ERROR, error_body(500, "runner crashed", hop="runner"))


async def refuse_400(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
    await stream.send(FrameType.ERROR, error_body(400, "max_tokens must be positive"))


async def drop_link_before_data(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
    await node.link.close("simulated crash")


async def drop_link_after_data(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
    await stream.send(FrameType.DATA, b'{"i": 0}')
    await asyncio.sleep(0.05)
    await node.link.close("simulated crash")


async def hang_until_cancel(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
    async for got in stream:
        if got.type == FrameType.CANCEL:
            node.cancelled += 1
            node.cancel_seen.set()
            return


async def one_chunk_then_wait(node: ScriptedNode, stream: Stream, frame: Frame) -> None:
    await stream.send(FrameType.DATA, b'{"i": 0}')
    await hang_until_cancel(node, stream, frame)


@dataclass
class ScriptedNode:
    name: str
    link: Link
    behaviour: Behaviour
    requests: list[dict[str, Any]] = field(default_factory=list)
    cancelled: int = 0
    cancel_seen: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    mux: Mux | None = None
    commands: list[dict[str, Any]] = field(default_factory=list)
    refuse_load: str | None = None

    async def on_control(self, frame: Frame) -> None:
        """COMMAND load: answer RESULT (after a moment), then report the model loaded."""
        if frame.type != FrameType.COMMAND:
            return
        assert self.mux is not None
        self.commands.append(frame.body)
        await asyncio.sleep(0.2)
        head = {"id": frame.body["id"], "op": frame.body["op"]}
        if self.refuse_load:
            error = error_body(507, self.refuse_load)
            await self.mux.send_control(FrameType.RESULT, {**head, "ok": False, "error": error})
            return
        await self.mux.send_control(FrameType.RESULT, {**head, "ok": True, "result": {}})
        await self.mux.send_control(FrameType.INVENTORY, {"models": [
            {"name": frame.body["model"], "loaded": True}]})

    async def until_cancelled(self) -> None:
        """Return once a CANCEL reached this node (fails after 5 s rather than hang)."""
        async with asyncio.timeout(5):
            await self.cancel_seen.wait()

    async def on_stream(self, stream: Stream, frame: Frame) -> None:
        self.requests.append(frame.body)
        await self.behaviour(self, stream, frame)


@dataclass
class Fleet:
    store: Store
    registry: Registry
    gateway: Gateway
    key: X25519PrivateKey
    url: str
    nodes: list[ScriptedNode] = field(default_factory=list)

    async def node(self, name: str, behaviour: Behaviour, *, decode_tps: float = 0.0,
                   models: tuple[str, ...] = (MODEL,), loaded: bool = True) -> ScriptedNode:
        identity = Identity.generate()
        token_id, secret = self.store.create_token(60, {}, time.time())
        self.store.redeem_token(token_id, secret, identity.did, time.time())
        link = await connect(self.url, identity, public_bytes(self.key))
        node = ScriptedNode(name, link, behaviour)
        node.mux = Mux(link, initiator=True, on_stream=node.on_stream,
                       on_control=node.on_control)
        node.task = asyncio.create_task(node.mux.run())
        await node.mux.send_control(FrameType.INVENTORY, {"models": [
            {"name": m, "loaded": loaded, "size_bytes": 1 << 20} for m in models]})
        await node.mux.send_control(FrameType.TELEMETRY, {"runtime": {
            m: {"decode_tps": decode_tps, "prefill_tps": decode_tps} for m in models},
            "host": {"mem_available_bytes": 8 << 30}})
        deadline = time.monotonic() + 5
        while True:
            conn = self.registry.get(identity.did)
            if conn is not None and conn.models and conn.telemetry:
                break
            assert time.monotonic() < deadline, "node never registered"
            await asyncio.sleep(0.01)
        node.name = identity.did
        self.nodes.append(node)
        return node


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    registry = Registry()
    gateway = Gateway(store, registry)
    key = X25519PrivateKey.generate()
    server = await serve("127.0.0.1", 0, key, gateway.authorize, gateway.on_link)
    port = next(iter(server.sockets)).getsockname()[1]
    fleet = Fleet(store, registry, gateway, key, f"ws://127.0.0.1:{port}")
    yield fleet
    for node in fleet.nodes:
        await node.link.close()
        if node.task:
            with contextlib.suppress(Exception):
                await node.task
    server.close()
    await server.wait_closed()
    store.close()


def request(stream: bool = True) -> OpenRequest:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    return OpenRequest("req_1", "chat/completions", MODEL, stream, body.encode())


def want(**kw: Any) -> Request:
    return Request(models=kw.pop("models", [MODEL]), prompt_tokens=10, max_tokens=10, **kw)


async def drain(served: Served) -> list[bytes]:
    return [served.first, *[c async for c in served.rest()]]
