"""uvicorn inside our own daemons: stop on SIGTERM/SIGINT and then let us clean up.

``uvicorn.Server.serve`` captures SIGINT and SIGTERM while it runs and, once it
has shut down, raises the captured signal again against the handler that was
there before. For SIGTERM that is the default action, which kills the process
on the spot: the daemon's own ``finally`` (stop the llama.cpp runners, close
the tunnel and the store) never runs and the runners are orphaned. A daemon
that owns child processes must finish its shutdown first, so this server
swallows the re-raise: ``serve()`` simply returns after a signal.

:func:`run` runs a daemon's main coroutine on asyncio's loop, or on uvloop's
(libuv, in C) with ``MESHGATE_LOOP=uvloop`` when uvloop is installed (it is not a
dependency). uvloop measured ~0.1 ms less CPU per request on the node's local port
(1.24 -> 1.14 ms non-stream, 1.85 -> 1.72 ms on a 16-chunk stream,
scripts/bench/overhead.py's shapes, interleaved) for +2.1 MiB idle RSS, but it is
not the default: the node's client to its runners was aiohttp then, which is known
not to close a connection before its end under uvloop (MagicStack/uvloop#471, open),
and a runner must see a cancelled stream's client go; two unexplained first-token
timeouts on the tunnel path were also seen with it in the e2e suite. (The client is
now node_agent/runtimes/http1.py; uvloop has not been measured or tested with it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

import uvicorn

__all__ = ["DaemonServer", "loop_factory", "run"]

T = TypeVar("T")
log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DaemonServer(uvicorn.Server):
    """A uvicorn server whose ``serve()`` returns on SIGINT/SIGTERM instead of re-raising."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """None for asyncio's loop; uvloop's factory with ``MESHGATE_LOOP=uvloop`` (if installed)."""
    if os.environ.get("MESHGATE_LOOP", "asyncio") != "uvloop":
        return None
    try:  # by name: uvloop is optional, so type checking must not need it installed
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        log.warning("MESHGATE_LOOP=uvloop but uvloop is not installed: running on asyncio's")
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
