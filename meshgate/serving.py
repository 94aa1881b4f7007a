"""uvicorn inside our own daemons: stop on SIGTERM/SIGINT and then let us clean up.

``uvicorn.Server.serve`` captures SIGINT and SIGTERM while it runs and, once it
has shut down, raises the captured signal again against the handler that was
there before. For SIGTERM that is the default action, which kills the process
on the spot: the daemon's own ``finally`` (stop the llama.cpp runners, close
the tunnel and the store) never runs and the runners are orphaned. A daemon
that owns child processes must finish its shutdown first, so this server
swallows the re-raise: ``serve()`` simply returns after a signal.

:func:`run` runs a daemon's main coroutine on the loop its caller names as its default
(asyncio's, or uvloop's: libuv, in C), unless ``MESHGATE_LOOP=asyncio`` or
``MESHGATE_LOOP=uvloop`` says otherwise; uvloop is a dependency except on Windows, where
the default falls back to asyncio's (a loop asked for by name and missing is warned of).

- **The coordinator runs on uvloop by default** (issue 13): paired runs on one box
  (scripts/bench/request_cpu.py --against-env MESHGATE_LOOP=asyncio) gave 0.10 ms less CPU
  per request non-streamed (1.52 -> 1.42 ms) and 0.11 ms less streamed (2.37 -> 2.26 ms),
  and -0.14 ms the session before; the e2e suite runs every coordinator on it.
- **The node runs on uvloop by default too** (issue 13): under 500 concurrent 64-chunk
  streams the node's CPU per round was 0.81x the upstream's on uvloop against 0.96x on
  asyncio's (medians of 6 rounds, both nodes in one run: ``scripts/bench/streams.py
  --rounds 6 --against-node-env MESHGATE_LOOP=asyncio``). It ran on asyncio's loop while
  its client to the runners was aiohttp, which is known not to close a connection before
  its end under uvloop (MagicStack/uvloop#471, open): a runner must see a cancelled
  stream's client go. Its client is now node_agent/runtimes/http1.py (a plain
  ``asyncio.Protocol``; ``transport.close()``), and tests/node and tests/e2e (cancel,
  shutdown, failover, the llama.cpp runners' subprocesses and signals) pass with every
  node on uvloop.

:func:`run` also raises the cyclic collector's young-generation threshold for the
daemon's life (`GC_THRESHOLD`; ``MESHGATE_GC=default`` keeps CPython's 700, 10, 10).
A daemon with hundreds of streams in flight holds tens of thousands of young objects
(frames, buffers, generators, futures), and CPython collected them every 700 container
allocations: each collection walks what is in flight, and survivors push the older
generations into full collections (~150-250 ms each on the 2-core box). Measured with
``scripts/bench/streams.py --streams 500 --rounds 3`` (gc callbacks timing every
collection, one run each, same box): the coordinator spent 1.07-1.64 s collecting over
the run with CPython's thresholds, 0.26-0.40 s with (10000, 10, 10); the node 0.36-0.46 s
against 0.13-0.19 s. Garbage in reference cycles waits up to 10,000 allocations longer
(coordinator RSS growth over the three rounds stayed +1.5-2.0 MiB); everything else is
freed by reference counting as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

import uvicorn

__all__ = ["GC_THRESHOLD", "DaemonServer", "gc_threshold", "loop_factory", "run"]

T = TypeVar("T")
log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: The collector's thresholds while a daemon runs (see the module doc).
GC_THRESHOLD = (10_000, 10, 10)


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


def loop_factory(default: str = "asyncio") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """None for asyncio's loop, uvloop's factory for uvloop's: ``MESHGATE_LOOP`` if set, else
    `default` ("asyncio" or "uvloop"; uvloop only where it is installed)."""
    name = os.environ.get("MESHGATE_LOOP") or default
    if name != "uvloop":
        return None
    try:  # by name: no uvloop on Windows, so type checking must not need it installed
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if "MESHGATE_LOOP" in os.environ:
            log.warning("MESHGATE_LOOP=uvloop but uvloop is not installed: running on asyncio's")
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def gc_threshold() -> tuple[int, int, int] | None:
    """`GC_THRESHOLD`, or None with ``MESHGATE_GC=default`` (CPython's own)."""
    return None if os.environ.get("MESHGATE_GC") == "default" else GC_THRESHOLD


def run(main: Coroutine[Any, Any, T], *, loop: str = "asyncio") -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_factory` picks (`loop`: the default),
    with the collector's thresholds at :func:`gc_threshold` meanwhile."""
    before = gc.get_threshold()
    threshold = gc_threshold()
    if threshold is not None:
        gc.set_threshold(*threshold)
    try:
        with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
            return runner.run(main)
    finally:
        gc.set_threshold(*before)
