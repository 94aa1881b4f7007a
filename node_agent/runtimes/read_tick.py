"""Read coalescing on a busy node: a stream's reads that come close together, one wake.

Like vLLM's ``--stream-interval``, but in time and only under load. While at least
``streams`` streamed answers are being read at once (default :data:`DEFAULT_STREAMS`),
a read of a stream's upstream that comes less than ``tick_s`` after that stream's reader
was last woken does not wake it at once: it waits for the next shared tick, one timer
for every stream, due at most ``tick_s`` after the first read it holds (default
:data:`DEFAULT_TICK_S`, 2 ms). Whatever else the stream's server sent meanwhile goes
with it: one batch of chunks, one compact token frame, one SSE write on the
coordinator (``meshgate/token_frames.py``'s batches). Every chunk still arrives, whole
and in order; only its wake-up moves, by less than one tick.

No added delay otherwise:

- below ``streams`` open streams (a lone stream, SmolLM2 on a laptop), every read wakes
  its reader at once;
- a read that comes ``tick_s`` or more after the reader was last woken (tokens at model
  pace: tens of ms apart) wakes it at once;
- an answer's end and a lost connection wake at once (`Http1Pool`'s connection does not
  ask the tick for those);
- ``tick_s`` 0 turns it off.

The operator's settings are ``stream_tick_ms`` (0 to :data:`MAX_TICK_S` in ms) and
``stream_tick_streams`` (node_agent/config.py); the node's daemon passes them to
:func:`configure`, which sets the process's tick (:data:`READ_TICK`), shared by every
runtime's connection pool.

Where it binds: the instant test upstream at 64 concurrent streams writes a stream's
chunks 0.3-1 ms apart (several gather in a 2 ms tick); at 500 it writes them 8-50 ms
apart (p5-p95: a 2 ms tick almost never holds one; see the note of
``scripts/bench/streams.py``).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["DEFAULT_STREAMS", "DEFAULT_TICK_S", "MAX_TICK_S", "READ_TICK", "ReadTick",
           "configure"]

#: The tick (seconds): the longest a read is held.
DEFAULT_TICK_S = 0.002
#: Streams read at once from which reads are gathered.
DEFAULT_STREAMS = 16
#: The longest tick an operator may set (the product's rule: one short tick at most).
MAX_TICK_S = 0.002


class Held(Protocol):
    """A reader's connection that a read was held for."""

    def tick_wake(self, now: float) -> None:
        """Wake the reader with what it holds (the tick is due; `now`: the loop's time)."""


class ReadTick:
    """One process's shared tick: who waits for it, and when it is due."""

    def __init__(self, tick_s: float = DEFAULT_TICK_S, streams: int = DEFAULT_STREAMS) -> None:
        self.tick_s = tick_s
        self.streams = streams
        self.open = 0
        """streamed answers being read now (`Http1Response.chunks` counts them)"""
        self.held_reads = 0
        """reads held for a tick so far (one a stream a tick: those that joined it add none)"""
        self.joined = 0
        """reads that joined one held for the tick: wakes (and token frames) saved"""
        self.ticks = 0
        """ticks that fired so far"""
        self._held: list[Held] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def engaged(self) -> bool:
        """Whether reads are gathered now (enough streams open, a tick set)."""
        return self.open >= self.streams and self.tick_s > 0

    def hold(self, held: Held, loop: asyncio.AbstractEventLoop, now: float) -> None:
        """`held` waits for the tick, started at `now` (`loop`'s time) if none is due."""
        if self._timer is not None and self._loop is not loop:  # a loop that ended with a
            self._timer, self._held = None, []  # tick due (tests run one loop each)
        self._held.append(held)
        self.held_reads += 1
        if self._timer is None:
            self._loop = loop
            self._timer = loop.call_at(now + self.tick_s, self.fire)

    def fire(self) -> None:
        """The tick: wake every reader held for it."""
        self._timer = None
        held, self._held = self._held, []
        self.ticks += 1
        now = self._loop.time() if self._loop is not None else 0.0
        for conn in held:
            conn.tick_wake(now)


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
