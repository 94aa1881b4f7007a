"""Writes within one turn of the event loop sent as one (the daemons' HTTP servers).

On loopback each ``send()`` is a trip through the kernel's TCP stack and a wake-up of the
reader, so what an app sends within one turn (a response's head and body, the chunks of a
stream that came in one read) leaves in one ``send()`` (meshgate/http_protocols.py wraps
every connection's transport in a :class:`CorkedTransport`).
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["CORK_MAX_BYTES", "CorkedTransport"]

#: Held writes are sent at once past this many bytes (flow control then sees them).
CORK_MAX_BYTES = 64 * 1024


class CorkedTransport:
    """A transport whose writes within one loop turn go out as one ``write``.

    Anything else is the wrapped transport's own. ``close`` sends what is held
    first; ``abort`` drops it.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._held_bytes = 0
        self.corked = True

    def uncork(self) -> None:
        """Send what is held, and each later write at once, until the response ends (a
        stream whose writer already writes once a burst: `SSE_CORK` in the scope)."""
        self.flush()
        self.corked = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self.corked:
            if not self.transport.is_closing():
                self.transport.write(data)
            return
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(bytes(data))
        self._held_bytes += len(data)
        if self._held_bytes >= CORK_MAX_BYTES:
            self.flush()

    def write_last(self, data: bytes) -> None:
        """A response's last bytes: sent at once, after what is held (the response's end
        would flush them in this turn anyway: no loop callback is set for them)."""
        if self._held:
            self._held.append(data)
            self._held_bytes += len(data)
            self.flush()
        elif not self.transport.is_closing():
            self.transport.write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held.clear()
        self._held_bytes = 0
        if not self.transport.is_closing():
            self.transport.write(data)

    def is_closing(self) -> bool:  # asked on every write and request: not via __getattr__
        return self.transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._held_bytes + self.transport.get_write_buffer_size()

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self._held.clear()
        self._held_bytes = 0
        self.transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)
