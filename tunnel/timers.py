"""One loop timer for many links' ping deadlines (a coarse timer wheel).

A coordinator holds a link per node, and each link's ping rules (`Connection.tick`) want
a wake-up at the link's next deadline: about two a minute per link (the periodic PING,
then its timeout check). One loop timer per link and deadline (`call_later`) is a timer
handle made and pushed on the loop's heap each time (with uvloop, a libuv timer each),
7% of a 10,000-node coordinator's idle CPU in session 6's profile. Here deadlines are
rounded *up* to a tick of `grain` seconds and every link due in the same tick shares
one loop timer: a link's deadline is a dict entry, and the loop holds at most one timer
per tick that has links in it.

So a link's timer fires up to `grain` seconds after its deadline, never before: every
liveness bound (a PING's timeout, a silent peer dropped within its bound) holds with
`grain` added; `serve` keeps the grain at a tenth of its ping interval and timeout at
most (`TIMER_GRAIN_S` by default: 80 s becomes 80.25 s at most).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Protocol

TIMER_GRAIN_S = 0.25

__all__ = ["TIMER_GRAIN_S", "TimerWheel", "Waker"]


class Waker(Protocol):
    """What the wheel wakes: `_on_timer` once its deadline's tick came."""

    def _on_timer(self) -> None: ...


class TimerWheel:
    def __init__(self, grain: float = TIMER_GRAIN_S) -> None:
        if not grain > 0:
            raise ValueError("grain must be > 0")
        self.grain = grain
        self._ticks: dict[int, dict[Waker, None]] = {}  # tick -> who is due then, in order
        self._due: dict[Waker, int] = {}  # who is waiting -> its tick

    def __len__(self) -> int:
        """Wakers waiting."""
        return len(self._due)

    def set(self, waker: Waker, deadline: float) -> None:
        """Wake `waker` at `deadline` (time.monotonic()), rounded up to the next tick
        (replaces what it waited for before)."""
        tick = math.ceil(deadline / self.grain)
        held = self._due.get(waker)
        if held == tick:
            return
        if held is not None:
            self._ticks[held].pop(waker, None)
        self._due[waker] = tick
        due = self._ticks.get(tick)
        if due is None:
            due = self._ticks[tick] = {}
            delay = max(0.0, tick * self.grain - time.monotonic())
            asyncio.get_running_loop().call_later(delay, self._fire, tick)
        due[waker] = None

    def discard(self, waker: Waker) -> None:
        """`waker` waits no more (its tick's loop timer stays; it fires for the others)."""
        held = self._due.pop(waker, None)
        if held is not None:
            self._ticks[held].pop(waker, None)

    def waiting(self, waker: Waker) -> bool:
        return waker in self._due

    def _fire(self, tick: int) -> None:
        due = self._ticks.pop(tick, None)
        if not due:
            return
        for waker in due:
            del self._due[waker]
        for waker in due:
            waker._on_timer()
