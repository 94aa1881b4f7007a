"""uvicorn inside our own daemons: stop on SIGTERM/SIGINT and then let us clean up.

``uvicorn.Server.serve`` captures SIGINT and SIGTERM while it runs and, once it
has shut down, raises the captured signal again against the handler that was
there before. For SIGTERM that is the default action, which kills the process
on the spot: the daemon's own ``finally`` (stop the llama.cpp runners, close
the tunnel and the store) never runs and the runners are orphaned. A daemon
that owns child processes must finish its shutdown first, so this server
swallows the re-raise: ``serve()`` simply returns after a signal.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Generator

import uvicorn

__all__ = ["DaemonServer"]

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
