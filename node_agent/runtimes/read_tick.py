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

The mechanism (the probe, the lag, engaging, the shared tick) is meshgate/lag_tick.py's,
shared with the coordinator's write pacing (coordinator/write_tick.py); this module keeps
what is the node's: the process's tick and its settings.
"""

from __future__ import annotations

from collections.abc import Mapping

from meshgate import lag_tick
from meshgate.lag_tick import (
    CALM_S,
    DEFAULT_CAP_S,
    DEFAULT_ENGAGE_S,
    DEFAULT_STREAMS,
    MIN_TICK_S,
    PEAK_WINDOW_S,
    PROBE_S,
    SMOOTHING,
    Held,
    LagTick,
)

__all__ = ["CALM_S", "DEFAULT_CAP_S", "DEFAULT_ENGAGE_S", "DEFAULT_STREAMS", "MIN_TICK_S",
           "PEAK_WINDOW_S", "PROBE_S", "READ_TICK", "SMOOTHING", "Held", "ReadTick",
           "configure", "fixed_lag"]

#: The node's name for the shared pacing core: its streams are streamed answers being read
#: (`Http1Response.chunks` counts them), `paused_reads` the reads a connection then waited.
ReadTick = LagTick

#: The process's pacing (a node runs one loop): what `Http1Pool` uses unless given its own.
READ_TICK = ReadTick()


def configure(cap_s: float, engage_s: float = DEFAULT_ENGAGE_S, streams: int = DEFAULT_STREAMS,
              fixed_lag_s: float | None = None) -> None:
    """Set the process's pacing (the node's settings): a cap of 0 s turns it off."""
    READ_TICK.configure(cap_s, engage_s, streams, fixed_lag_s)


def fixed_lag(env: Mapping[str, str]) -> float | None:
    """``MESHGATE_STREAM_LAG_MS`` (tests only): the lateness the probe reports, in seconds."""
    return lag_tick.fixed_lag(env, "MESHGATE_STREAM_LAG_MS")
