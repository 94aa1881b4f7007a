"""The bounds on one HTTP server (see :mod:`meshgate.httpserver`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COORDINATOR_LIMITS", "NODE_LIMITS", "HttpLimits"]


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
