"""Read pacing on a node that runs behind: streams' upstream reads gathered at a shared tick.

Like Linux's NAPI (an interrupt per packet while idle, batched polling under load), keyed
on the node being behind, not on a stream count:

- **The signal: lag.** While ``streams`` or more streamed answers are read, a probe due every
  :data:`PROBE_S` records how late the event loop ran it; ``lag_s`` is that lateness,
  smoothed (an exponential mean, weight :data:`SMOOTHING` a sample). A node that keeps up
  runs its timers on time; a node whose loop is busy with many streams runs them late, and
  every token it relays waits that long anyway.
- **Engaged** once ``lag_s`` reaches ``engage_s`` (default 2 ms); **disengaged** only after
  ``lag_s`` stayed under half of it for :data:`CALM_S` (hysteresis: pacing lowers the lag
  it answers, so a single quiet sample must not turn it off). While not engaged, and below
  ``streams`` streams read at once (a floor: a handful of streams never saves enough to be
  worth a delay), reading never pauses: a lone stream, a few streams and SmolLM2's rate
  are read as the bytes come.
- **While engaged**, a stream whose upstream is read again less than ``tick_s`` after its
  last read (or the last tick it waited for) has what was read sent on at once, and its
  connection then stops reading until the next shared tick (one loop timer for every
  stream). What its server sends meanwhile waits in the kernel and is read in one piece at
  the tick: one read, one batch of chunks, one compact token frame, one SSE write on the
  coordinator, not one of each a piece. ``tick_s = min(cap_s, max(MIN_TICK_S, peak_s))``,
  ``peak_s`` the longest lateness of the last :data:`PEAK_WINDOW_S`: a token is held no
  longer than the loop has just made a timer wait (and never past ``cap_s``, default
  50 ms), and the reads saved shrink that lateness. A stream's first read is never paused
  (time to first token); every chunk still arrives, whole and in order.
- ``cap_s`` 0 turns pacing off (no probe either).

Why the peak and not the mean: a busy loop reads each socket once a turn, so a stream's
reads come about a loop turn apart, while a timer's lateness is spread over the whole turn
(0 to a turn; 500 streams on two shared cores: p50 4-30 ms, p90 30-60 ms). A tick the
length of the mean lateness is shorter than the interval between a stream's reads and
almost never pauses one (measured: 4,000 reads paused in 4 rounds of 33,000 chunks,
reads unchanged); the recent worst lateness is about a turn and binds
(``scripts/bench/streams.py --streams 500``: node reads a round -44%, coordinator CPU
-29%, node CPU -17%, one paired run at load 5-6).

The operator's settings are ``stream_tick_ms`` (the cap), ``stream_tick_engage_ms`` and
``stream_tick_streams`` (node_agent/config.py); the daemon passes them to :func:`configure`,
which sets the process's tick (:data:`READ_TICK`), shared by every runtime's connection
pool. ``MESHGATE_STREAM_LAG_MS`` (tests only) replaces the measured lateness by a constant,
so that a test engages pacing whatever the box's speed. The node's /metrics show the state
(``meshgate_node_read_pacing_*``: node_agent/metrics.py).

:meth:`ReadTick.observe` and :meth:`ReadTick.paces` are pure (time passed in); the loop's
part is the probe timer and the tick timer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from typing import Protocol

__all__ = ["CALM_S", "DEFAULT_CAP_S", "DEFAULT_ENGAGE_S", "DEFAULT_STREAMS", "MIN_TICK_S",
           "PEAK_WINDOW_S", "PROBE_S", "READ_TICK", "SMOOTHING", "ReadTick", "configure",
           "fixed_lag"]

#: The longest tick by default (seconds): the most a token is held.
DEFAULT_CAP_S = 0.05
#: The smoothed lateness from which reads are paced.
DEFAULT_ENGAGE_S = 0.002
#: Streams read at once below which reads are never paced, whatever the lag.
DEFAULT_STREAMS = 16
#: The shortest tick (below it a tick saves next to nothing).
MIN_TICK_S = 0.002
#: How often the probe timer is due while streams are read.
PROBE_S = 0.01
#: The weight of a new lateness sample in the smoothed lag.
SMOOTHING = 0.25
#: The tick follows the longest lateness over this last while.
PEAK_WINDOW_S = 0.25
#: How long the lag must stay under half the threshold before pacing stops.
CALM_S = 0.5


class Held(Protocol):
    """A connection whose reading waits for the tick."""

    def tick_resume(self) -> None:
        """The tick is due: read again."""


class ReadTick:
    """One process's pacing: its lag, whether it is engaged, which connections wait."""

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
        """streamed answers being read now (`Http1Response.chunks` counts them)"""
        self.paused_reads = 0
        """reads after which a connection waited for the tick, so far"""
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
    def tick_s(self) -> float:
        """The tick now: the recent peak lateness, at least :data:`MIN_TICK_S`, at most the
        cap."""
        return min(self.cap_s, max(MIN_TICK_S, self.peak_s))

    @property
    def on(self) -> bool:
        """Whether pacing is switched on at all (a cap above 0)."""
        return self.cap_s > 0

    def paces(self) -> bool:
        """Whether reads are paced now: switched on, engaged, enough streams open."""
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
        """No stream is read: nothing measured, nothing paced (the next ones start afresh)."""
        self.lag_s = self.peak_s = 0.0
        self._recent.clear()
        self.engaged = False
        self._calm_since = None

    # the loop's part
    def opened(self, loop: asyncio.AbstractEventLoop) -> None:
        """A streamed answer starts being read (on `loop`): counted; from `streams` open
        on, the probe runs (below them nothing is measured: no timer for a lone stream)."""
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
        """A streamed answer is no longer read (the probe stops at its next turn below
        `streams`)."""
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
        """`held` reads again at the tick, started at `now` (`loop`'s time) if none is due."""
        self._bind(loop)
        self._held.append(held)
        self.paused_reads += 1
        if self._timer is None:
            self._timer = loop.call_at(now + self.tick_s, self.fire)

    def fire(self) -> None:
        """The tick: every connection that waited for it reads again."""
        self._timer = None
        held, self._held = self._held, []
        self.ticks += 1
        for conn in held:
            conn.tick_resume()


#: The process's pacing (a node runs one loop): what `Http1Pool` uses unless given its own.
READ_TICK = ReadTick()


def configure(cap_s: float, engage_s: float = DEFAULT_ENGAGE_S, streams: int = DEFAULT_STREAMS,
              fixed_lag_s: float | None = None) -> None:
    """Set the process's pacing (the node's settings): a cap of 0 s turns it off."""
    if cap_s < 0:
        raise ValueError(f"a read tick's cap is 0 (off) or more, not {cap_s * 1000:g} ms")
    if engage_s < 0:
        raise ValueError(f"read pacing engages at a lag of 0 ms or more, not {engage_s * 1000:g}")
    if streams < 1:
        raise ValueError(f"read pacing starts from 1 stream or more, not {streams}")
    READ_TICK.cap_s = cap_s
    READ_TICK.engage_s = engage_s
    READ_TICK.streams = streams
    READ_TICK.fixed_lag_s = fixed_lag_s


def fixed_lag(env: Mapping[str, str]) -> float | None:
    """``MESHGATE_STREAM_LAG_MS`` (tests only): the lateness the probe reports, in seconds."""
    text = env.get("MESHGATE_STREAM_LAG_MS")
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"MESHGATE_STREAM_LAG_MS={text!r}: must be a number of ms") from None
    if value < 0:
        raise ValueError(f"MESHGATE_STREAM_LAG_MS={text!r}: must be >= 0")
    return value / 1000
