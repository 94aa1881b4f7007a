"""Both daemons' HTTP servers, bounded: head and body read timeouts, a connection cap.

uvicorn alone holds a connection that sends half a request forever (its
keep-alive timer runs only between requests), and takes connections until the
process runs out of file descriptors, at which point every request fails and
asyncio logs each failed ``accept()``. :class:`GuardedH11Protocol` is uvicorn's
own h11 protocol with three bounds added (numbers in :class:`HttpLimits`):

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
``server_config`` builds a ``uvicorn.Config`` with all of it, and puts the log
flood filter (meshgate/logflood.py) on every log handler; the environment
variables ``MESHGATE_HTTP_HEAD_TIMEOUT_S``, ``MESHGATE_HTTP_BODY_TIMEOUT_S``,
``MESHGATE_HTTP_WRITE_TIMEOUT_S`` and ``MESHGATE_HTTP_MAX_CONNECTIONS`` override the
defaults.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from meshgate.logflood import install_flood_filter

__all__ = ["COORDINATOR_LIMITS", "NODE_LIMITS", "GuardedH11Protocol", "HttpLimits",
           "fit_to_fd_limit", "raise_fd_limit", "server_config"]

log = logging.getLogger(__name__)

FD_TARGET = 65536


@dataclass(frozen=True)
class HttpLimits:
    """Bounds on one HTTP server. Defaults are for the coordinator's public API."""

    head_timeout_s: float = 10.0
    """Programs send a request head in one write; 10 s covers a congested mobile link."""
    body_timeout_s: float = 30.0
    """Silence allowed between body bytes (a 4 MiB body at 1 Mbit/s still never waits 1 s)."""
    keep_alive_s: float = 5.0
    """Idle time between requests on a kept-alive connection (uvicorn's default)."""
    write_timeout_s: float = 60.0
    """A full send buffer this long (the client reads nothing) ends the connection."""
    max_connections: int = 4096
    """Open connections at once; cut to half the open-file limit at start."""
    max_head_bytes: int = 16 * 1024
    """Request line plus headers (h11's limit; nginx's default is 8-32 KiB)."""


COORDINATOR_LIMITS = HttpLimits()
NODE_LIMITS = HttpLimits(max_connections=512)
"""The node's local port serves the apps on one box: 512 at once is far past what one box's
runners can answer, and Ollama queues 512 by default (OLLAMA_MAX_QUEUE)."""


class GuardedH11Protocol(H11Protocol):
    limits = HttpLimits()
    #: connections waiting for a request head, oldest first (one dict per server)
    waiting: dict[GuardedH11Protocol, None] = {}  # noqa: RUF012 - per server, see server_config
    refused_connections = 0
    evicted_connections = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections and not self._evict_one():
            self._refused = True
            type(self).refused_connections += 1
            log.warning("connection cap reached (%d open, all with requests in flight): "
                        "closing new connections until some end", self.limits.max_connections)
            transport.abort()
            return
        super().connection_made(transport)
        self._wait_for_head()

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for a request head; False if none."""
        for victim in self.waiting:
            del self.waiting[victim]
            type(self).evicted_connections += 1
            log.warning("connection cap reached (%d open): closing the one that waited "
                        "longest for a request", self.limits.max_connections)
            victim._cancel_timers()
            self.connections.discard(victim)
            victim.transport.abort()
            return True
        return False

    def _wait_for_head(self) -> None:
        self.waiting[self] = None
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._too_slow,
                                                    "request head")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self.waiting.pop(self, None)
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self.conn.their_state is h11.IDLE and self._head_timer is None:
            self._wait_for_head()  # a kept-alive connection's next request starts
        super().data_received(data)
        state = self.conn.their_state
        if state is not h11.IDLE:
            self.waiting.pop(self, None)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if state is h11.SEND_BODY and not self.transport.is_closing():
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._too_slow,
                                                    "request body")

    def on_response_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.waiting[self] = None  # idle, kept alive: first to go when the cap is reached

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.write_timeout_s,
                                                     self._not_reading)

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().resume_writing()

    def _not_reading(self) -> None:
        self._write_timer = None
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info("closing the connection of %s: it read nothing of its answer for %g s",
                 client, self.limits.write_timeout_s)
        self.transport.abort()  # close() would wait for the buffer to drain: never

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._write_timer = None

    def _too_slow(self, what: str) -> None:
        self._head_timer = self._body_timer = None
        if self.transport.is_closing():
            return
        limit = (self.limits.head_timeout_s if what == "request head"
                 else self.limits.body_timeout_s)
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info("closing the connection of %s: its %s took more than %g s", client, what, limit)
        self.transport.close()


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
    """`limits` with what the MESHGATE_HTTP_* environment variables set."""
    env = os.environ.get
    return dataclasses.replace(
        limits,
        head_timeout_s=float(env("MESHGATE_HTTP_HEAD_TIMEOUT_S") or limits.head_timeout_s),
        body_timeout_s=float(env("MESHGATE_HTTP_BODY_TIMEOUT_S") or limits.body_timeout_s),
        write_timeout_s=float(env("MESHGATE_HTTP_WRITE_TIMEOUT_S") or limits.write_timeout_s),
        max_connections=int(env("MESHGATE_HTTP_MAX_CONNECTIONS") or limits.max_connections),
    )


def server_config(app: Any, limits: HttpLimits | None = None, **options: Any) -> uvicorn.Config:
    """A uvicorn.Config for `app` with `limits` (see the module doc) and any other uvicorn
    `options` (host, port, log_level...)."""
    limits = fit_to_fd_limit(from_env(limits or HttpLimits()), raise_fd_limit())
    protocol = type("GuardedH11", (GuardedH11Protocol,), {"limits": limits, "waiting": {}})
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
