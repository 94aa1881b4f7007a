"""The node's local port refuses what a web page could make a browser send it.

Any page a user opens can make their browser send requests to
``127.0.0.1:11438``: cross-site ``fetch``/form posts (no CORS preflight for a
"simple" request), or a DNS-rebinding name that resolves to 127.0.0.1 so the
page becomes "same-origin" with the port. :class:`LocalGuard` (pure ASGI, in
front of every route) answers those with an OpenAI-shaped error before any
route runs:

- **Host** (DNS rebinding): the Host header must name this box by a loopback
  name (``localhost``, ``*.localhost``), an IP literal (a rebinding page has a
  domain name, never an address) or a name in ``allowed_hosts``
  (``MESHGATE_ALLOWED_HOSTS``, comma-separated; ``*`` allows any). Else 403.
- **Origin** (cross-site pages): a request that carries an ``Origin`` is
  refused (403) unless the origin is allowed: pages served from this box
  (``http(s)://localhost|127.0.0.1|[::1]`` on any port) and the app schemes
  (``app:``, ``file:``, ``tauri:``, ``vscode-webview:``), as Ollama allows by
  default, plus the globs in ``allowed_origins`` (``MESHGATE_ORIGINS``, like
  ``OLLAMA_ORIGINS``: ``https://chat.example.com,https://*.corp.example``).
  ``Origin: null`` (sandboxed frames, ``data:`` pages) is never allowed. A
  browser that says ``Sec-Fetch-Site: cross-site`` without an Origin is
  refused too. Allowed origins get CORS answers (preflight and headers).
- **Content type** (simple requests): a browser's request (one with an
  ``Origin`` or ``Sec-Fetch-*`` header, which pages cannot forge) to a JSON
  route with ``text/plain``, a form, or no content type is refused (415):
  JSON routes take ``application/json`` from browsers. Programs that are not
  browsers (curl, the SDKs) are not limited by this: ``curl -d`` sends a form
  content type, as Ollama's own docs do.
- **Admin routes** (``/meshgate/swap|load|unload``) take no browser request
  at all, from any origin (their loopback-peer check stays in the route).

Whether a local app may spend cloud money through the mesh is decided on the
coordinator, not here: a node is not trusted to police itself, so requests it
relays never reach a paid cloud unless the coordinator's ``[relay] cloud``
says so (coordinator/relay.py).
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterable
from fnmatch import fnmatchcase

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["DEFAULT_ORIGINS", "LocalGuard", "guard_from_env"]

DEFAULT_ORIGINS = (
    "http://localhost", "https://localhost", "http://localhost:*", "https://localhost:*",
    "http://127.0.0.1", "https://127.0.0.1", "http://127.0.0.1:*", "https://127.0.0.1:*",
    "http://[::1]", "https://[::1]", "http://[::1]:*", "https://[::1]:*",
    "app://*", "file://*", "tauri://*", "vscode-webview://*",
)
ADMIN_PREFIX = "/meshgate/"
ADMIN_WRITES = ("/meshgate/swap", "/meshgate/load", "/meshgate/unload")
SIMPLE_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


class LocalGuard:
    def __init__(self, app: ASGIApp, *, allowed_origins: Iterable[str] = (),
                 allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        self.origins = tuple(DEFAULT_ORIGINS) + tuple(o.strip() for o in allowed_origins
                                                      if o.strip())
        self.hosts = tuple(h.strip().lower() for h in allowed_hosts if h.strip())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        refusal = self._refusal(scope, headers, origin)
        if refusal is not None:
            await _error(send, *refusal)
            return
        if origin is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await _preflight(send, origin, headers)
            return

        async def send_cors(message: dict[str, object]) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"access-control-allow-origin", origin.encode("latin-1")),
                         (b"vary", b"Origin")]
                message = {**message, "headers": [*message.get("headers", []), *extra]}  # type: ignore[misc]
            await send(message)

        await self.app(scope, receive, send_cors)  # type: ignore[arg-type]

    def _refusal(self, scope: Scope, headers: dict[str, str],  # noqa: PLR0911 - one per rule
                 origin: str | None) -> tuple[int, str, str] | None:
        host = headers.get("host")
        if host is not None and not self.host_allowed(host):
            return (403, f"Host {host[:100]!r} is not this box: the local port answers only to "
                    "localhost or an IP address (set MESHGATE_ALLOWED_HOSTS to add names)",
                    "host_not_allowed")
        browser = origin is not None or any(k.startswith("sec-fetch-") for k in headers)
        if not browser:
            return None
        path: str = scope["path"]
        if path.startswith(ADMIN_WRITES):
            return (403, f"{path} is not for web pages", "browser_not_allowed")
        if origin is None:
            if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
                return (403, "cross-site requests need an allowed Origin", "origin_not_allowed")
        elif not self.origin_allowed(origin):
            return (403, f"Origin {origin[:100]!r} is not allowed here (set MESHGATE_ORIGINS "
                    "to allow it)", "origin_not_allowed")
        if scope["method"] in WRITE_METHODS and not path.startswith(ADMIN_PREFIX):
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype in SIMPLE_TYPES or not ctype:
                return (415, f"send JSON with 'Content-Type: application/json', not "
                        f"{ctype or 'no content type'!r}", "unsupported_media_type")
        return None

    def host_allowed(self, host: str) -> bool:
        name = _hostname(host)
        if name == "localhost" or name.endswith(".localhost") or _is_ip(name):
            return True
        return any(fnmatchcase(name, pattern) for pattern in self.hosts)

    def origin_allowed(self, origin: str) -> bool:
        if origin == "null":
            return False
        return any(fnmatchcase(origin.lower(), pattern.lower()) for pattern in self.origins)


def guard_from_env(app: ASGIApp) -> LocalGuard:
    """A LocalGuard with the allow-lists from MESHGATE_ORIGINS and MESHGATE_ALLOWED_HOSTS."""
    return LocalGuard(app, allowed_origins=os.environ.get("MESHGATE_ORIGINS", "").split(","),
                      allowed_hosts=os.environ.get("MESHGATE_ALLOWED_HOSTS", "").split(","))


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:11438
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def _error(send: Send, status: int, message: str, code: str) -> None:
    kind = "permission_error" if status == 403 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": code, "hop": "node"}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _preflight(send: Send, origin: str, headers: dict[str, str]) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-allow-methods", b"GET, POST, OPTIONS, DELETE"),
        (b"access-control-allow-headers",
         headers.get("access-control-request-headers", "").encode("latin-1")[:1000]
         or b"authorization, content-type"),
        (b"access-control-max-age", b"600"),
        (b"vary", b"Origin"),
    ]})
    await send({"type": "http.response.body", "body": b""})
