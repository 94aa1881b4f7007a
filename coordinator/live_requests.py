"""Requests in flight on the public API, for the web pane's "live requests" table.

A pure ASGI middleware (it never reads or buffers a body) notes each OpenAI
request when it arrives and forgets it when its response ends. The model and
request id are read from the request's state, where the API puts them once it
has parsed the body; the node or cloud answering is read from the response's
`x-meshgate-node` / `x-meshgate-upstream` header; streamed chunks are counted
as they leave.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

TRACKED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_SHOWN = 200


@dataclass
class InFlight:
    path: str
    started: float
    state: dict[str, Any]
    target: str | None = None
    status: int | None = None
    chunks: int = 0

    def view(self, now: float) -> dict[str, Any]:
        return {"request_id": self.state.get("request_id"), "model": self.state.get("model"),
                "endpoint": self.path.removeprefix("/v1/"), "target": self.target,
                "status": self.status, "chunks": self.chunks,
                "age_s": round(now - self.started, 2)}


@dataclass
class LiveRequests:
    _open: dict[int, InFlight] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def begin(self, path: str, state: dict[str, Any]) -> int:
        ident = next(self._ids)
        self._open[ident] = InFlight(path, time.time(), state)
        return ident

    def get(self, ident: int) -> InFlight | None:
        return self._open.get(ident)

    def end(self, ident: int) -> None:
        self._open.pop(ident, None)

    def __len__(self) -> int:
        return len(self._open)

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """The oldest first, at most MAX_SHOWN."""
        shown = sorted(self._open.values(), key=lambda r: r.started)[:MAX_SHOWN]
        return [r.view(now) for r in shown]


def note_response(entry: InFlight, message: Message) -> None:
    """What an answer's ASGI `message` tells the entry: status and target, or a chunk."""
    if message["type"] == "http.response.start":
        entry.status = int(message["status"])
        for name, value in message.get("headers", []):
            if name in (b"x-meshgate-node", b"x-meshgate-upstream"):
                text = value.decode("latin-1")
                entry.target = text if name == b"x-meshgate-node" else f"cloud:{text}"
    elif message["type"] == "http.response.body" and message.get("body"):
        entry.chunks += 1


def note_answer(entry: InFlight, status: int, headers: list[tuple[bytes, bytes]],
                body: bytes) -> None:
    """`note_response` of a whole answer written at once (its head and its one body)."""
    entry.status = status
    for name, value in headers:
        if name in (b"x-meshgate-node", b"x-meshgate-upstream"):
            text = value.decode("latin-1")
            entry.target = text if name == b"x-meshgate-node" else f"cloud:{text}"
    if body:
        entry.chunks += 1


class LiveRequestsMiddleware:
    def __init__(self, app: ASGIApp, tracker: LiveRequests) -> None:
        self.app = app
        self.tracker = tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in TRACKED:
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        ident = self.tracker.begin(scope["path"], state)

        async def watch(message: Message) -> None:
            entry = self.tracker.get(ident)
            if entry is not None:
                note_response(entry, message)
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.tracker.end(ident)
