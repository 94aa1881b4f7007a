"""The hot routes' request and answer plumbing below Starlette's conveniences: the body
read from the ASGI `receive` (413 past the limit), the headers they read in one pass over
the scope, and a whole JSON answer with its raw headers built once."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope

from coordinator.routing import ROUTE_HEADER
from meshgate.openai import MAX_BODY_BYTES, OpenAIError


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """A request's body, refused (413) past `limit` before it is read whole."""
    return await receive_body(request.receive, request.headers.get("content-length"), limit)


async def receive_body(receive: Receive, declared: str | None,
                        limit: int = MAX_BODY_BYTES) -> bytes:
    """The body from the ASGI `receive` itself (the hot routes call it directly, no Request
    stream): refused (413) past `limit`, by its declared length first; a client gone before
    its body ended raises ClientDisconnect as Starlette's stream does."""
    if declared and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise OpenAIError(413, f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect


#: The request headers the hot routes read (ASGI names are lower case).
READ_HEADERS = frozenset({b"authorization", b"content-length", b"x-request-id",
                           ROUTE_HEADER.lower().encode(), b"x-meshgate-timeout"})


def headers_of(scope: Scope) -> dict[bytes, str]:
    """The headers of `READ_HEADERS` a request has (the first of each, as Starlette's
    ``Headers.get``), in one pass, kept in the scope: the request id (hot_routes) and the
    route (api) read the same dict."""
    found: dict[bytes, str] | None = scope.get(_READ)
    if found is None:
        found = scope[_READ] = {}
        for name, value in scope["headers"]:
            if name in READ_HEADERS and name not in found:
                found[name] = value.decode("latin-1")
    return found


_READ = "meshgate.read_headers"


class JsonAnswer(Response):
    """A whole JSON answer: Starlette's ``Response(data, media_type=JSON, headers=...)``
    with its raw headers built here (no header mapping lower-cased and encoded again)."""

    media_type = "application/json"

    def __init__(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        self.raw_headers = [*headers, (b"content-length", str(len(body)).encode()),
                            (b"content-type", b"application/json")]
