"""A pacing tick's state as Prometheus families (meshgate/lag_tick.py's two users).

The node's read pacing (``meshgate_node_read_pacing_*``) and the coordinator's write
pacing (``meshgate_coordinator_write_pacing_*``) show the same state of their `LagTick`:
four gauges (``_engaged``, ``_lag_seconds``, ``_tick_seconds``, ``_streams``) and three
counters (what was held, ``_ticks``, ``_engagements``). Each user names its own prefix,
help texts and held counter.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from meshgate.lag_tick import LagTick

__all__ = ["tick_metrics"]


def tick_metrics(tick: LagTick, prefix: str, helps: Mapping[str, str],
                 held: str) -> Iterator[Metric]:
    """`tick`'s families, each named `prefix` + "_" + a suffix and helped by `helps` under
    that suffix: the gauges, then the counters, the first of them `held` (the times a
    stream waited for the tick)."""
    paced = tick.paces()
    for suffix, value in (("engaged", 1.0 if paced else 0.0), ("lag_seconds", tick.lag_s),
                          ("tick_seconds", tick.tick_s if paced else 0.0),
                          ("streams", float(tick.open))):
        gauge = GaugeMetricFamily(f"{prefix}_{suffix}", helps[suffix])
        gauge.add_metric([], value)
        yield gauge
    for suffix, count in ((held, tick.held), ("ticks", tick.ticks),
                          ("engagements", tick.engagements)):
        counter = CounterMetricFamily(f"{prefix}_{suffix}", helps[suffix])
        counter.add_metric([], float(count))
        yield counter
