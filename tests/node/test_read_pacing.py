"""Read pacing's rules (node_agent/runtimes/read_tick.py; the mechanism is meshgate/lag_tick.py,
shared with the coordinator's write pacing), in memory with time passed in:
when it engages (the loop's smoothed lateness), when it lets go (hysteresis), the tick it
uses (the recent worst lateness, between 2 ms and the cap), the stream floor, the off
switch, and the node's metrics that show it. The reads themselves: test_read_tick.py."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.core import Metric

from node_agent.metrics import pacing_metrics
from node_agent.runtimes.read_tick import (
    CALM_S,
    MIN_TICK_S,
    PEAK_WINDOW_S,
    PROBE_S,
    ReadTick,
)

MS = 0.001


def fed(tick: ReadTick, late_s: float, start: float, samples: int) -> float:
    """`samples` probes each `late_s` late, PROBE_S apart from `start`; the time after."""
    now = start
    for _ in range(samples):
        now += PROBE_S + late_s
        tick.observe(late_s, now)
    return now


def busy(streams: int = 16, **kw: float) -> ReadTick:
    tick = ReadTick(**kw)  # type: ignore[arg-type]
    tick.open = streams
    return tick


def test_a_loop_on_time_never_engages_pacing() -> None:
    tick = busy(500)
    fed(tick, 0.5 * MS, 0.0, 200)  # idle or lightly loaded: timers under a ms late
    assert not tick.engaged
    assert not tick.paces()
    assert tick.engagements == 0


def test_a_late_loop_engages_once_the_smoothed_lag_reaches_the_threshold() -> None:
    tick = busy()
    tick.observe(5 * MS, 0.01)  # one late sample: smoothed to 1.25 ms, below 2
    assert not tick.engaged
    tick.observe(5 * MS, 0.02)  # 2.19 ms
    assert tick.engaged
    assert tick.paces()
    assert tick.engagements == 1


def test_pacing_needs_the_stream_floor_whatever_the_lag() -> None:
    tick = busy(streams=15)  # the floor is 16 by default
    fed(tick, 30 * MS, 0.0, 10)
    assert tick.engaged
    assert not tick.paces()
    tick.open = 16
    assert tick.paces()


def test_disengaging_waits_for_a_calm_loop_and_a_late_sample_restarts_the_wait() -> None:
    tick = busy()
    now = fed(tick, 10 * MS, 0.0, 10)
    assert tick.engaged
    now = fed(tick, 1.5 * MS, now, 100)  # under the threshold, above half of it: stays
    assert tick.engaged
    now = fed(tick, 0.0, now, 5)  # under half of it, but not for CALM_S yet
    assert tick.lag_s < 1 * MS
    assert tick.engaged
    now = fed(tick, 0.0, now, int(CALM_S / PROBE_S) - 6)
    assert tick.engaged
    now = fed(tick, 8 * MS, now, 1)  # a late turn: the calm starts over
    now = fed(tick, 0.0, now, int(CALM_S / PROBE_S) - 2)
    assert tick.engaged
    fed(tick, 0.0, now, 10)  # calm for longer than CALM_S
    assert not tick.engaged
    assert not tick.paces()
    assert tick.engagements == 1


def test_the_tick_is_the_recent_worst_lateness_between_2_ms_and_the_cap() -> None:
    tick = busy(cap_s=50 * MS)
    now = fed(tick, 10 * MS, 0.0, 5)
    now = fed(tick, 30 * MS, now, 1)
    now = fed(tick, 3 * MS, now, 3)
    assert tick.lag_s < 30 * MS
    assert tick.tick_s == pytest.approx(30 * MS)  # the worst of the window, not the mean
    now = fed(tick, 3 * MS, now, int(PEAK_WINDOW_S / PROBE_S))  # the 30 ms turn ages out
    assert tick.tick_s == pytest.approx(3 * MS)
    now = fed(tick, 0.0, now, int(PEAK_WINDOW_S / PROBE_S) + 1)
    assert tick.tick_s == MIN_TICK_S  # never under 2 ms
    fed(tick, 200 * MS, now, 1)
    assert tick.tick_s == 50 * MS  # never over the cap


def test_a_cap_of_zero_turns_pacing_off() -> None:
    tick = busy(cap_s=0.0)
    fed(tick, 30 * MS, 0.0, 10)
    assert not tick.on
    assert not tick.paces()


def test_a_fixed_lag_replaces_what_the_probe_measures() -> None:
    tick = busy(fixed_lag_s=20 * MS)
    fed(tick, 0.0, 0.0, 3)
    assert tick.engaged
    assert tick.tick_s == pytest.approx(20 * MS)


def test_an_engage_threshold_of_zero_paces_from_the_first_probe() -> None:
    tick = busy(engage_s=0.0)
    tick.observe(0.0, 0.01)
    assert tick.paces()


class Probed(ReadTick):
    """A tick whose probe's turns (a sample taken, or the state forgotten) can be awaited."""

    def __init__(self, **kw: float) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.turned = asyncio.Event()

    def observe(self, late_s: float, now: float) -> None:
        super().observe(late_s, now)
        self.turned.set()

    def reset(self) -> None:
        super().reset()
        self.turned.set()

    async def next_turn(self) -> None:
        self.turned.clear()
        async with asyncio.timeout(10):
            await self.turned.wait()


def test_below_the_floor_no_probe_runs_and_the_lag_is_forgotten_when_streams_end() -> None:
    async def main() -> ReadTick:
        tick = Probed(streams=2, fixed_lag_s=10 * MS)
        loop = asyncio.get_running_loop()
        tick.opened(loop)
        assert tick._probe is None  # a lone stream: no timer at all
        tick.opened(loop)
        assert tick._probe is not None
        while not tick.engaged:  # the probe's own timer (a fixed lateness) engages it
            await tick.next_turn()
        assert tick.paces()
        tick.closed()
        await tick.next_turn()  # below the floor: the probe stops, what it measured forgotten
        assert tick._probe is None
        assert (tick.engaged, tick.lag_s, tick.peak_s) == (False, 0.0, 0.0)
        tick.closed()
        return tick

    assert asyncio.run(main()).open == 0


def value(metrics: list[Metric], name: str) -> float:
    (family,) = [m for m in metrics if m.name == name]
    return float(family.samples[0].value)


def test_the_metrics_say_whether_reads_are_paced_and_how_much() -> None:
    tick = busy(cap_s=50 * MS)
    idle = list(pacing_metrics(tick))
    assert value(idle, "meshgate_node_read_pacing_engaged") == 0.0
    assert value(idle, "meshgate_node_read_pacing_tick_seconds") == 0.0
    fed(tick, 20 * MS, 0.0, 10)
    tick.paused_reads, tick.ticks = 7, 3
    paced = list(pacing_metrics(tick))
    assert value(paced, "meshgate_node_read_pacing_engaged") == 1.0
    assert value(paced, "meshgate_node_read_pacing_tick_seconds") == pytest.approx(20 * MS)
    assert value(paced, "meshgate_node_read_pacing_lag_seconds") == pytest.approx(
        tick.lag_s)
    assert value(paced, "meshgate_node_read_pacing_streams") == 16.0
    assert value(paced, "meshgate_node_read_pacing_paused_reads") == 7.0
    assert value(paced, "meshgate_node_read_pacing_ticks") == 3.0
    assert value(paced, "meshgate_node_read_pacing_engagements") == 1.0
