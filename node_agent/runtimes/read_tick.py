"""Read pacing on a busy node: a stream's upstream read at most once a shared tick.

Like vLLM's ``--stream-interval``, but in time and only under load. While at least
``streams`` streamed answers are being read at once (default :data:`DEFAULT_STREAMS`),
a stream whose upstream is read again less than ``tick_s`` after its last read (default
:data:`DEFAULT_TICK_S`, 2 ms) has what was read sent on at once, and its connection then
stops reading until the next shared tick (one loop timer for every stream, due at most
``tick_s`` after the first read it paused). What its server sends meanwhile waits in the
kernel and is read in one piece at the tick: one read, one batch of chunks, one compact
token frame, one SSE write on the coordinator (``meshgate/token_frames.py``'s batches),
not one of each a piece. Every chunk still arrives, whole and in order; none waits more
than one tick (and the loop turn that reads it).

No added delay otherwise:

- below ``streams`` open streams (a lone stream, SmolLM2 on a laptop), reading never
  pauses;
- a stream read ``tick_s`` or more after its last read (tokens at model pace: tens of ms
  apart) is not paused;
- ``tick_s`` 0 turns it off.

The operator's settings are ``stream_tick_ms`` (0 to :data:`MAX_TICK_S` in ms) and
``stream_tick_streams`` (node_agent/config.py); the node's daemon passes them to
:func:`configure`, which sets the process's tick (:data:`READ_TICK`), shared by every
runtime's connection pool.

Where it binds: the instant test upstream at 64 concurrent streams writes a stream's
chunks 0.3-1 ms apart; at 500 it writes them 8-50 ms apart (p5-p95), so at 500 streams a
2 ms tick almost never pauses a read. With the cap lifted (``scripts/bench/streams.py
--streams 500``, one paired run each, load ~4.5): a 50 ms tick cut the node's upstream
reads 27%, its CPU 20% and the coordinator's 18%; 100 ms: reads 49%, node 23%,
coordinator 14%.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["DEFAULT_STREAMS", "DEFAULT_TICK_S", "MAX_TICK_S", "READ_TICK", "ReadTick",
           "configure"]

#: The tick (seconds): the longest a stream's reading waits.
DEFAULT_TICK_S = 0.002
#: Streams read at once from which reads are paced.
DEFAULT_STREAMS = 16
#: The longest tick an operator may set (the product's rule: one short tick at most).
MAX_TICK_S = 0.002


class Held(Protocol):
    """A connection whose reading waits for the tick."""

    def tick_resume(self) -> None:
        """The tick is due: read again."""


class ReadTick:
    """One process's shared tick: which connections wait for it, and when it is due."""

    def __init__(self, tick_s: float = DEFAULT_TICK_S, streams: int = DEFAULT_STREAMS) -> None:
        self.tick_s = tick_s
        self.streams = streams
        self.open = 0
        """streamed answers being read now (`Http1Response.chunks` counts them)"""
        self.paused_reads = 0
        """reads after which a connection waited for the tick, so far"""
        self.ticks = 0
        """ticks that fired so far"""
        self._held: list[Held] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def engaged(self) -> bool:
        """Whether reads are paced now (enough streams open, a tick set)."""
        return self.open >= self.streams and self.tick_s > 0

    def hold(self, held: Held, loop: asyncio.AbstractEventLoop, now: float) -> None:
        """`held` reads again at the tick, started at `now` (`loop`'s time) if none is due."""
        if self._timer is not None and self._loop is not loop:  # a loop that ended with a
            self._timer, self._held = None, []  # tick due (tests run one loop each)
        self._held.append(held)
        self.paused_reads += 1
        if self._timer is None:
            self._loop = loop
            self._timer = loop.call_at(now + self.tick_s, self.fire)

    def fire(self) -> None:
        """The tick: every connection that waited for it reads again."""
        self._timer = None
        held, self._held = self._held, []
        self.ticks += 1
        for conn in held:
            conn.tick_resume()


#: The process's tick (a node runs one loop): what `Http1Pool` uses unless given its own.
READ_TICK = ReadTick()


def configure(tick_s: float, streams: int) -> None:
    """Set the process's tick (the node's settings): 0 s turns it off."""
    if not 0 <= tick_s <= MAX_TICK_S:
        raise ValueError(f"a read tick is 0 to {MAX_TICK_S * 1000:g} ms, not {tick_s * 1000:g}")
    if streams < 1:
        raise ValueError(f"read coalescing starts from 1 stream or more, not {streams}")
    READ_TICK.tick_s = tick_s
    READ_TICK.streams = streams
