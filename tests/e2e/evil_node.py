"""A malicious node for attack tests: enrolled for real, speaking the real tunnel library,
saying whatever the test wants (lying usage, injected SSE, huge request ids).

`EvilNode.start(mesh, name)` enrolls it with the real CLI, connects with its real identity
and announces `models`; each request the coordinator opens is answered by `answer`
(default: the frames in `reply`). `ask()` opens a request upward, as an app's
request relayed by a node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from node_agent.state import NodeState
from tests.e2e.mesh import Mesh
from tunnel import Frame, FrameType, Link, Mux, Stream, connect

Answer = Callable[[Stream, Frame], Awaitable[None]]


def chunk(text: str, model: str = "evil") -> bytes:
    """One honest streaming chunk (OpenAI's chat.completion.chunk)."""
    return json.dumps({"id": "chatcmpl-evil", "object": "chat.completion.chunk", "created": 1,
                       "model": model, "choices": [{"index": 0, "delta": {"content": text},
                                                    "finish_reason": None}]}).encode()


def completion(text: str, model: str = "evil") -> bytes:
    return json.dumps({"id": "chatcmpl-evil", "object": "chat.completion", "created": 1,
                       "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": text}}]}).encode()


@dataclass
class EvilNode:
    link: Link
    mux: Mux
    did: str
    models: list[str]
    reply: list[tuple[FrameType, Any]] = field(default_factory=list)
    answer: Answer | None = None
    opened: list[dict[str, Any]] = field(default_factory=list)
    _runner: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, mesh: Mesh, name: str, models: list[str]) -> EvilNode:
        result = await asyncio.to_thread(mesh.enroll, name)
        assert result.returncode == 0, result.stderr
        state = NodeState(mesh.root / name)
        enrollment = state.enrollment()
        assert enrollment is not None
        link = await connect(enrollment.url, state.identity(), enrollment.coordinator_key,
                             info={"host": "evil"})
        node = cls(link=link, mux=Mux(link, initiator=True), did=enrollment.did, models=models)
        node.mux.on_stream = node._serve
        node._runner = asyncio.create_task(node.mux.run())
        await node.mux.send_control(FrameType.INVENTORY, {"models": models})
        await node.mux.send_control(FrameType.TELEMETRY, {"runtime": {}})
        return node

    async def _serve(self, stream: Stream, frame: Frame) -> None:
        self.opened.append(frame.body if isinstance(frame.body, dict) else {})
        if self.answer is not None:
            await self.answer(stream, frame)
            return
        for kind, body in self.reply:
            await stream.send(kind, body)

    async def ask(self, body: dict[str, Any], *, request_id: str = "relay-1",
                  endpoint: str = "chat/completions") -> Stream:
        """Open a request upward, as the node would for an app on its box."""
        return await self.mux.open({"request_id": request_id, "endpoint": endpoint,
                                    "model": body["model"], "stream": bool(body.get("stream")),
                                    "body": json.dumps(body).encode()})

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.link.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(BaseException):
                await self._runner


async def drain(stream: Stream) -> list[Frame]:
    """Every frame of `stream` up to its END or ERROR (30 s at most)."""
    frames = []
    async with asyncio.timeout(30):
        while True:
            frame = await stream.recv()
            frames.append(frame)
            if frame.type in (FrameType.END, FrameType.ERROR, FrameType.CANCEL):
                return frames
