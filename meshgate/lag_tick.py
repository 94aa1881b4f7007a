"""Pacing keyed on event-loop lag: per-stream I/O gathered at one shared tick while behind.

Like Linux's NAPI (an interrupt per packet while idle, batched polling under load), keyed
on the process being behind, not on a stream count. Two users, one rule:

- the node's upstream reads (node_agent/runtimes/read_tick.py): a stream read again within
  a tick stops reading until the tick;
- the coordinator's client writes (coordinator/write_tick.py): a stream written again
  within a tick holds its SSE bytes until the tick.

The rule:

- **The signal: lag.** While ``streams`` or more streams are open, a probe due every
  :data:`PROBE_S` records how late the event loop ran it; ``lag_s`` is that lateness,
  smoothed (an exponential mean, weight :data:`SMOOTHING` a sample). A process that keeps
  up runs its timers on time; one whose loop is busy with many streams runs them late,
  and every token it relays waits that long anyway.
- **Engaged** once ``lag_s`` reaches ``engage_s`` (default 2 ms); **disengaged** only after
  ``lag_s`` stayed under half of it for :data:`CALM_S` (hysteresis: pacing lowers the lag
  it answers, so a single quiet sample must not turn it off). While not engaged, and below
  ``streams`` open streams (a floor: a handful of streams never saves enough to be worth
  a delay), nothing waits.
- **While engaged** (:meth:`LagTick.paces`), the user decides per stream whether it acted
  less than :attr:`LagTick.tick_s` ago; if so it :meth:`LagTick.hold`\\ s itself and is
  resumed (``tick_resume``) at the next shared tick: one loop timer for every held stream.
  ``tick_s = min(cap_s, max(MIN_TICK_S, peak_s))``, ``peak_s`` the longest lateness of the
  last :data:`PEAK_WINDOW_S`: nothing is held longer than the loop has just made a timer
  wait (and never past ``cap_s``, default 50 ms).
- ``cap_s`` 0 turns pacing off (no probe either).

Why the peak and not the mean: a busy loop serves each stream once a turn, so a stream's
I/O comes about a loop turn apart, while a timer's lateness is spread over the whole turn
(0 to a turn). A tick the length of the mean lateness is shorter than the interval
between a stream's reads and almost never holds one; the recent worst lateness is about a
turn and binds (measurements: node_agent/runtimes/read_tick.py).

``fixed_lag_s`` (tests only, from an environment variable: :func:`fixed_lag`) replaces
the measured lateness by a constant, so that a test engages pacing whatever the box's
speed. :meth:`LagTick.observe` and :meth:`LagTick.paces` are pure (time passed in); the
loop's part is the probe timer and the tick timer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from typing import Protocol

__all__ = ["CALM_S", "DEFAULT_CAP_S", "DEFAULT_ENGAGE_S", "DEFAULT_STREAMS", "MIN_TICK_S",
           "PEAK_WINDOW_S", "PROBE_S", "SMOOTHING", "Held", "LagTick", "fixed_lag"]

#: The longest tick by default (seconds): the most a token is held.
DEFAULT_CAP_S = 0.05
#: The smoothed lateness from which streams are paced.
DEFAULT_ENGAGE_S = 0.002
#: Streams open at once below which nothing is paced, whatever the lag.
DEFAULT_STREAMS = 16
#: The shortest tick (below it a tick saves next to nothing).
MIN_TICK_S = 0.002
#: How often the probe timer is due while enough streams are open.
PROBE_S = 0.01
#: The weight of a new lateness sample in the smoothed lag.
SMOOTHING = 0.25
#: The tick follows the longest lateness over this last while.
PEAK_WINDOW_S = 0.25
#: How long the lag must stay under half the threshold before pacing stops.
CALM_S = 0.5


class Held(Protocol):
    """A stream that waits for the tick."""

    def tick_resume(self) -> None:
        """The tick is due: go on."""


class LagTick:
    """One process's pacing: its lag, whether it is engaged, which streams wait."""

    def __init__(self, cap_s: float = DEFAULT_CAP_S, engage_s: float = DEFAULT_ENGAGE_S,
                 streams: int = DEFAULT_STREAMS, fixed_lag_s: float | None = None) -> None:
        self.cap_s = cap_s
        self.engage_s = engage_s
        self.streams = streams
        self.fixed_lag_s = fixed_lag_s
        """a constant that replaces each measured lateness (tests)"""
        self.lag_s = 0.0
        """the loop's lateness, smoothed"""
        self.engaged = False
        """whether the lag says pace (see `paces` for the stream floor)"""
        self.open = 0
        """streams open now (`opened` / `closed`)"""
        self.paused_reads = 0
        """times a stream waited for the tick, so far (the node's name: reads paused)"""
        self.ticks = 0
        """ticks that fired so far"""
        self.engagements = 0
        """times pacing engaged so far"""
        self.peak_s = 0.0
        """the longest lateness in the last `PEAK_WINDOW_S`"""
        self._recent: deque[tuple[float, float]] = deque()
        self._calm_since: float | None = None
        self._held: list[Held] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._probe: asyncio.TimerHandle | None = None
        self._probe_due = 0.0

    @property
    def held(self) -> int:
        """Times a stream waited for the tick, so far (`paused_reads` by another name)."""
        return self.paused_reads

    @property
    def tick_s(self) -> float:
        """The tick now: the recent peak lateness, at least :data:`MIN_TICK_S`, at most the
        cap."""
        return min(self.cap_s, max(MIN_TICK_S, self.peak_s))

    @property
    def on(self) -> bool:
        """Whether pacing is switched on at all (a cap above 0)."""
        return self.cap_s > 0

    def paces(self) -> bool:
        """Whether streams are paced now: switched on, engaged, enough streams open."""
        return self.engaged and self.open >= self.streams and self.on

    def observe(self, late_s: float, now: float) -> None:
        """A probe ran `late_s` late at `now`: the smoothed lag, engaged or not."""
        if self.fixed_lag_s is not None:
            late_s = self.fixed_lag_s
        self.lag_s += SMOOTHING * (late_s - self.lag_s)
        recent = self._recent
        recent.append((now, late_s))
        while recent[0][0] <= now - PEAK_WINDOW_S:
            recent.popleft()
        self.peak_s = max(late for _, late in recent)
        if not self.engaged:
            if self.lag_s >= self.engage_s:
                self.engaged = True
                self.engagements += 1
                self._calm_since = None
        elif self.lag_s >= self.engage_s / 2:
            self._calm_since = None
        elif self._calm_since is None:
            self._calm_since = now
        elif now - self._calm_since >= CALM_S:
            self.engaged = False
            self._calm_since = None

    def reset(self) -> None:
        """Too few streams: nothing measured, nothing paced (the next ones start afresh)."""
        self.lag_s = self.peak_s = 0.0
        self._recent.clear()
        self.engaged = False
        self._calm_since = None

    # the loop's part
    def opened(self, loop: asyncio.AbstractEventLoop) -> None:
        """A stream opens (on `loop`): counted; from `streams` open on, the probe runs
        (below them nothing is measured: no timer for a lone stream)."""
        self.open += 1
        self._bind(loop)
        if self._probe is None and self.open >= self.streams:
            self._probe_due = loop.time() + PROBE_S
            self._probe = loop.call_at(self._probe_due, self._probed)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:  # a loop that ended with a probe or a tick due is gone
            if self._loop is not None:  # with them, and what they measured (tests run one
                self._probe = self._timer = None  # loop each)
                self._held = []
                self.reset()
            self._loop = loop

    def closed(self) -> None:
        """A stream closed (the probe stops at its next turn below `streams`)."""
        self.open -= 1

    def _probed(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if self.open < self.streams:
            self._probe = None
            self.reset()
            return
        self.observe(max(0.0, now - self._probe_due), now)
        self._probe_due = now + PROBE_S
        self._probe = loop.call_at(self._probe_due, self._probed)

    def hold(self, held: Held, loop: asyncio.AbstractEventLoop, now: float) -> None:
        """`held` goes on at the tick, started at `now` (`loop`'s time) if none is due."""
        self._bind(loop)
        self._held.append(held)
        self.paused_reads += 1
        if self._timer is None:
            self._timer = loop.call_at(now + self.tick_s, self.fire)

    def fire(self) -> None:
        """The tick: every stream that waited for it goes on."""
        self._timer = None
        held, self._held = self._held, []
        self.ticks += 1
        for stream in held:
            stream.tick_resume()

    def configure(self, cap_s: float, engage_s: float = DEFAULT_ENGAGE_S,
                  streams: int = DEFAULT_STREAMS, fixed_lag_s: float | None = None) -> None:
        """Set the operator's settings (a cap of 0 s turns pacing off); ValueError for a
        setting out of range."""
        if cap_s < 0:
            raise ValueError(f"a pacing tick's cap is 0 (off) or more, not {cap_s * 1000:g} ms")
        if engage_s < 0:
            raise ValueError(f"pacing engages at a lag of 0 ms or more, not {engage_s * 1000:g}")
        if streams < 1:
            raise ValueError(f"pacing starts from 1 stream or more, not {streams}")
        self.cap_s = cap_s
        self.engage_s = engage_s
        self.streams = streams
        self.fixed_lag_s = fixed_lag_s


def fixed_lag(env: Mapping[str, str], name: str) -> float | None:
    """The environment variable `name` (a tests-only hook, in ms): the lateness the probe
    reports, in seconds; None when unset; ValueError when it is not a number >= 0."""
    text = env.get(name)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: must be a number of ms") from None
    if value < 0:
        raise ValueError(f"{name}={text!r}: must be >= 0")
    return value / 1000
