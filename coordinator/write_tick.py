"""Write pacing on a coordinator that runs behind: streams' SSE writes gathered at a tick.

The node paces its upstream reads by its own lag (node_agent/runtimes/read_tick.py); the
coordinator paces its writes to clients by the same rule (meshgate/lag_tick.py): while
its loop runs late (smoothed lag >= ``tick_engage_ms``) and ``tick_streams`` or more
streamed answers are being written, a stream that wrote to its client less than a tick
ago keeps what arrives next and writes it at the next shared tick (one loop timer for
every held stream): one write, one ASGI send and one wake-up of the client for what would
have been several. The tick is the loop's recent peak lateness (2 ms to ``tick_ms``,
default 50 ms): a token waits no longer than the loop has just made a timer wait anyway.

Never held (`coordinator/answer_stream.py`, `EventStream._write`):

- a stream's first chunk (time to first token): it leaves at once, as before;
- a stream's end: the END (or an error, or a lost link) arriving while a stream waits for
  the tick wakes it at once, and the end leaves with what was held;
- anything while the coordinator keeps up or few streams run: a lone stream, a handful of
  streams and an idle coordinator add no delay and start no timer;
- a cloud upstream's stream (read a chunk a pull, so nothing would go along: only a
  node's tunnel stream, which queues what arrives, is paced; `Served.gathers`).

The operator's settings are ``[stream] tick_ms``, ``tick_engage_ms`` and ``tick_streams``
in coordinator.toml (coordinator/config.py; ``tick_ms = 0`` turns it off); the server
passes them to :func:`configure`. ``MESHGATE_COORDINATOR_LAG_MS`` (tests only) replaces
the measured lateness by a constant. /metrics shows the state
(``meshgate_coordinator_write_pacing_*``: :func:`pacing_metrics`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from meshgate import lag_tick
from meshgate.lag_tick import DEFAULT_ENGAGE_S, DEFAULT_STREAMS, LagTick
from meshgate.tick_metrics import tick_metrics

__all__ = ["LAG_ENV", "WRITE_TICK", "PacingCollector", "configure", "fixed_lag",
           "pacing_metrics"]

#: The tests' hook: the lateness the probe reports, in ms.
LAG_ENV = "MESHGATE_COORDINATOR_LAG_MS"

#: The process's write pacing (a coordinator runs one loop).
WRITE_TICK = LagTick()


def configure(cap_s: float, engage_s: float = DEFAULT_ENGAGE_S, streams: int = DEFAULT_STREAMS,
              fixed_lag_s: float | None = None) -> None:
    """Set the process's write pacing: a cap of 0 s turns it off."""
    WRITE_TICK.configure(cap_s, engage_s, streams, fixed_lag_s)


def fixed_lag(env: Mapping[str, str]) -> float | None:
    """``MESHGATE_COORDINATOR_LAG_MS`` (tests only): the lateness the probe reports, in s."""
    return lag_tick.fixed_lag(env, LAG_ENV)


_HELPS = {
    "engaged": "1 while streamed answers' client writes are paced (the loop runs late, "
               "enough streams open).",
    "lag_seconds": "How late the coordinator's event loop runs its timers, smoothed (while "
                   "streams are written).",
    "tick_seconds": "The tick a paced stream's write waits for now (0 while not paced).",
    "streams": "Streamed answers being written now.",
    "held_writes": "Writes a stream held for the tick.",
    "ticks": "Ticks that fired.",
    "engagements": "Times write pacing engaged.",
}


def pacing_metrics(tick: LagTick) -> Iterator[Metric]:
    """Write pacing's state: why a client's tokens arrive in batches."""
    return tick_metrics(tick, "meshgate_coordinator_write_pacing", _HELPS, "held_writes")


class PacingCollector(Collector):
    """`pacing_metrics` of a tick on a Prometheus registry (read at each scrape)."""

    def __init__(self, tick: LagTick) -> None:
        self.tick = tick

    def collect(self) -> Iterator[Metric]:
        return pacing_metrics(self.tick)
