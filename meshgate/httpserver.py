"""Both daemons' HTTP servers, bounded: head and body read timeouts, a connection cap.

uvicorn alone holds a connection that sends half a request forever (its
keep-alive timer runs only between requests), and takes connections until the
process runs out of file descriptors, at which point every request fails and
asyncio logs each failed ``accept()``. The protocols of
:mod:`meshgate.http_protocols` are uvicorn's own with these bounds added (numbers
in :class:`HttpLimits`):

- **head timeout**: a request's line and headers must arrive within
  ``head_timeout_s`` of the connection opening, or of its first byte on a
  kept-alive connection; else the connection is closed (Slowloris).
- **body timeout**: while a request body is being read, ``body_timeout_s``
  without a byte closes the connection (the app sees the client gone).
- **write timeout**: a client that stops reading its answer (the socket's
  send buffer stays full) for ``write_timeout_s`` is disconnected, so it
  cannot hold a node's slot by never reading a stream.
- **connection cap**: at ``max_connections`` open connections, a new one
  takes the place of the connection that has waited longest for a request
  head (a slow or idle one), which is closed; when every open connection has a
  request in flight, the new one is closed at once, before a byte is read.
  Descriptors never run out, a flood of slow connections cannot lock out a
  client that sends its request promptly, and requests in flight are never
  cut (backpressure: past the cap the kernel's listen backlog holds
  connections until a slot frees, and clients retry).

The cap is also cut to half the process's open-file limit
(:func:`fit_to_fd_limit`), leaving the other half to tunnels, the store,
runners and threads; the shipped systemd units raise ``LimitNOFILE``.
``server_config`` builds a ``uvicorn.Config`` with all of it, on uvicorn's
httptools protocol (llhttp, in C) unless ``MESHGATE_HTTP_PARSER=h11`` asks for
its pure-Python h11 one (both bounded alike), and puts the log
flood filter (meshgate/logflood.py) on every log handler; the environment
variables ``MESHGATE_HTTP_HEAD_TIMEOUT_S``, ``MESHGATE_HTTP_BODY_TIMEOUT_S``,
``MESHGATE_HTTP_WRITE_TIMEOUT_S`` and ``MESHGATE_HTTP_MAX_CONNECTIONS`` override the
defaults.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import resource
from typing import Any

import uvicorn

from meshgate.http_protocols import GuardedHttpToolsProtocol
from meshgate.httplimits import COORDINATOR_LIMITS, NODE_LIMITS, HttpLimits
from meshgate.logflood import install_flood_filter
from meshgate.startup import StartupError

__all__ = ["COORDINATOR_LIMITS", "NODE_LIMITS", "PARSERS", "GuardedHttpToolsProtocol",
           "HttpLimits", "fit_to_fd_limit", "from_env", "protocol_class", "raise_fd_limit",
           "server_config"]

#: The values ``MESHGATE_HTTP_PARSER`` takes (httptools unless it says h11).
PARSERS = ("httptools", "h11")

log = logging.getLogger(__name__)

FD_TARGET = 65536


def raise_fd_limit(target: int = FD_TARGET) -> int:
    """Raise this process's soft open-file limit toward `target` (never past the hard
    limit); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


def fit_to_fd_limit(limits: HttpLimits, soft_limit: int | None = None) -> HttpLimits:
    """`limits` with its connection cap cut to half the open-file limit."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        return limits
    cap = max(16, min(limits.max_connections, soft_limit // 2))
    if cap == limits.max_connections:
        return limits
    return dataclasses.replace(limits, max_connections=cap)


def from_env(limits: HttpLimits) -> HttpLimits:
    """`limits` with what the MESHGATE_HTTP_* environment variables set. A bad value (not a
    number, not finite, not above 0; a fraction of a connection) is a StartupError naming
    the variable and the value: both daemons read these before they listen."""
    return dataclasses.replace(
        limits,
        head_timeout_s=_seconds("MESHGATE_HTTP_HEAD_TIMEOUT_S", limits.head_timeout_s),
        body_timeout_s=_seconds("MESHGATE_HTTP_BODY_TIMEOUT_S", limits.body_timeout_s),
        write_timeout_s=_seconds("MESHGATE_HTTP_WRITE_TIMEOUT_S", limits.write_timeout_s),
        max_connections=_count("MESHGATE_HTTP_MAX_CONNECTIONS", limits.max_connections),
    )


def _seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:  # NaN fails this too
        raise StartupError(f"{name}={text!r}: must be a number of seconds above 0")
    return value


def _count(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise StartupError(f"{name}={text!r}: must be a whole number of connections above 0")
    return int(text)


def protocol_class(limits: HttpLimits, parser: str | None = None) -> type[asyncio.Protocol]:
    """The bounded protocol for one server: `parser` ("httptools" or "h11"; default
    ``MESHGATE_HTTP_PARSER``, else httptools) with `limits` and its own waiting list."""
    parser = parser or os.environ.get("MESHGATE_HTTP_PARSER") or "httptools"
    if parser not in PARSERS:
        raise ValueError(f"MESHGATE_HTTP_PARSER must be one of {sorted(PARSERS)}, not {parser!r}")
    base: type[asyncio.Protocol] = GuardedHttpToolsProtocol
    if parser == "h11":
        from meshgate.http_h11 import GuardedH11Protocol  # deferred: h11 only when asked

        base = GuardedH11Protocol
    return type(f"{base.__name__}Bound", (base,), {"limits": limits, "waiting": {}})


def server_config(app: Any, limits: HttpLimits | None = None, *, parser: str | None = None,
                  **options: Any) -> uvicorn.Config:
    """A uvicorn.Config for `app` with `limits` (see the module doc), the `parser`'s protocol
    and any other uvicorn `options` (host, port, log_level...)."""
    limits = fit_to_fd_limit(from_env(limits or HttpLimits()), raise_fd_limit())
    protocol = protocol_class(limits, parser)
    log.debug("HTTP limits: %s", limits)
    config = uvicorn.Config(
        app,
        http=protocol,
        timeout_keep_alive=int(max(1, limits.keep_alive_s)),
        h11_max_incomplete_event_size=limits.max_head_bytes,
        **options,
    )
    install_flood_filter()  # on every handler, uvicorn's included (set up just above)
    return config
