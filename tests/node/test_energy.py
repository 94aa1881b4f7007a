"""Energy attribution (pure): intervals, wraps, estimates, fair shares, and the sum rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_agent.energy import (
    DeviceReading,
    Energy,
    EnergyAttributor,
    counter_delta,
    cpu_only,
    interval_energy,
    joules_cost,
)


def gpu(counter: float | None, power: float | None = None) -> DeviceReading:
    return DeviceReading("gpu0", counter_j=counter, power_w=power)


def test_counter_delta_plain_wrap_and_reset() -> None:
    assert counter_delta(10.0, 25.5, None) == 15.5
    assert counter_delta(250.0, 4.0, 262.0) == pytest.approx(16.0)  # past the range once
    assert counter_delta(250.0, 4.0, None) is None  # went back without a range: a reset
    assert counter_delta(300.0, 4.0, 262.0) is None  # prev beyond the range: not a wrap


def test_interval_prefers_the_counter_and_estimates_from_power_only_without_one() -> None:
    assert interval_energy(gpu(100.0, 50.0), gpu(130.0, 70.0), 1.0) == (30.0, False)
    joules, estimated = interval_energy(gpu(None, 50.0), gpu(None, 70.0), 2.0)
    assert (joules, estimated) == (120.0, True)  # trapezoid: (50 + 70) / 2 * 2 s
    assert interval_energy(gpu(None), gpu(None), 1.0) == (None, False)
    assert interval_energy(gpu(100.0), gpu(None, 70.0), 1.0) == (None, False)


def test_one_request_gets_everything_between_its_begin_and_end() -> None:
    a = EnergyAttributor()
    a.observe(0.0, [gpu(1000.0)])
    a.start("r1", 1.0, [gpu(1010.0)])  # 10 J idle before it
    a.observe(2.0, [gpu(1060.0)])
    energy = a.finish("r1", 3.0, [gpu(1100.0)])
    assert energy == Energy(90.0, estimated=False)
    assert a.totals.idle_j == 10.0
    assert a.totals.measured_j == 100.0


def test_concurrent_requests_share_each_interval_equally() -> None:
    a = EnergyAttributor()
    a.start("long", 0.0, [gpu(0.0)])
    a.start("short", 1.0, [gpu(40.0)])  # long alone: 40 J
    short = a.finish("short", 2.0, [gpu(100.0)])  # both: 60 J -> 30 each
    long = a.finish("long", 3.0, [gpu(120.0)])  # long alone again: 20 J
    assert short.joules == pytest.approx(30.0)
    assert long.joules == pytest.approx(90.0)
    assert a.totals.attributed_j == pytest.approx(120.0)


def test_shares_are_per_device_and_devices_add_up() -> None:
    a = EnergyAttributor()
    cpu = DeviceReading("rapl:intel-rapl:0", counter_j=5.0, wrap_j=262.143)
    a.start("r", 0.0, [gpu(0.0), cpu])
    energy = a.finish("r", 1.0, [gpu(300.0), DeviceReading("rapl:intel-rapl:0", 1.0, 262.143)])
    assert energy.joules == pytest.approx(300.0 + 258.143)  # the RAPL counter wrapped
    assert a.totals.by_device == pytest.approx({"gpu0": 300.0, "rapl:intel-rapl:0": 258.143})


def test_a_cpu_only_request_gets_no_share_of_the_gpus() -> None:
    a = EnergyAttributor()
    cpu = "rapl:intel-rapl:0"

    def both(g: float, c: float) -> list[DeviceReading]:
        return [gpu(g), DeviceReading(cpu, counter_j=c)]

    a.start("on-gpu", 0.0, both(0.0, 0.0))
    a.start("on-cpu", 1.0, both(100.0, 10.0), uses=cpu_only)
    on_cpu = a.finish("on-cpu", 2.0, both(300.0, 30.0))  # gpu +200 J, cpu +20 J
    on_gpu = a.finish("on-gpu", 3.0, both(400.0, 40.0))
    assert on_cpu.joules == pytest.approx(10.0)  # half the CPU's 20 J, none of the GPU's
    assert on_gpu.joules == pytest.approx(100.0 + 10.0 + 200.0 + 10.0 + 100.0 + 10.0)
    alone = EnergyAttributor()
    alone.start("on-cpu", 0.0, both(0.0, 0.0), uses=cpu_only)
    assert alone.finish("on-cpu", 1.0, both(50.0, 5.0)).joules == pytest.approx(5.0)
    assert alone.totals.idle_j == pytest.approx(50.0)  # the GPU's draw was nobody's
    assert cpu_only(cpu)
    assert not cpu_only("gpu0")


def test_power_only_gpu_gives_an_estimate_marked_as_such() -> None:
    a = EnergyAttributor()
    a.start("r", 10.0, [gpu(None, 100.0)])
    energy = a.finish("r", 12.0, [gpu(None, 300.0)])
    assert energy == Energy(400.0, estimated=True)
    assert a.totals.estimated_j == 400.0


def test_nothing_readable_is_not_measured_not_zero() -> None:
    a = EnergyAttributor()
    a.start("r", 0.0, [gpu(None)])
    assert a.finish("r", 5.0, [gpu(None)]) == Energy(None)
    b = EnergyAttributor()
    b.start("r", 0.0, [])
    assert b.finish("r", 5.0, []).joules is None


def test_a_counter_reset_loses_that_interval_only() -> None:
    a = EnergyAttributor()
    a.start("r", 0.0, [gpu(500.0)])
    a.observe(1.0, [gpu(10.0)])  # driver reloaded: unknown, not negative
    energy = a.finish("r", 2.0, [gpu(30.0)])
    assert energy.joules == pytest.approx(20.0)


def test_a_request_cannot_start_twice() -> None:
    a = EnergyAttributor()
    a.start("r", 0.0, [])
    with pytest.raises(KeyError):
        a.start("r", 1.0, [])


def test_cost_at_a_price_per_kwh() -> None:
    assert joules_cost(3.6e6, 0.25) == pytest.approx(0.25)
    assert Energy(7200.0).cost(0.30) == pytest.approx(0.0006)
    assert Energy(None).cost(0.30) is None
    assert Energy(10.0).cost(None) is None


# An event: ("start", id) | ("finish", id) | ("tick", None), each after dt seconds at `watts`.
events = st.lists(
    st.tuples(
        st.sampled_from(["start", "finish", "tick"]),
        st.integers(0, 5),
        st.floats(0.0, 3.0),
        st.floats(0.0, 700.0),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(events, st.booleans())
def test_attributed_plus_idle_is_what_was_measured(
    script: list[tuple[str, int, float, float]], wrapping: bool
) -> None:
    """Whatever the order of requests, every measured joule goes to exactly one place."""
    wrap = 500.0 if wrapping else None
    a = EnergyAttributor()
    t, counter, true_total = 0.0, 123.0, 0.0
    running: set[int] = set()
    finished = 0.0

    def reading() -> list[DeviceReading]:
        value = counter % wrap if wrap else counter
        return [DeviceReading("gpu0", counter_j=value, wrap_j=wrap)]

    a.observe(t, reading())
    for kind, rid, dt, watts in script:
        t += dt
        step = min(watts * dt, 499.0)  # a wrap is only knowable when < one range per interval
        counter += step
        true_total += step
        if kind == "start" and rid not in running:
            a.start(rid, t, reading())
            running.add(rid)
        elif kind == "finish" and rid in running:
            got = a.finish(rid, t, reading())
            running.discard(rid)
            finished += got.joules or 0.0
        else:
            a.observe(t, reading())
    still = sum(a.so_far(r).joules or 0.0 for r in running)
    totals = a.totals
    assert totals.measured_j == pytest.approx(true_total, abs=1e-6)
    assert finished + still == pytest.approx(totals.attributed_j, abs=1e-6)
    assert totals.attributed_j + totals.idle_j == pytest.approx(totals.measured_j, abs=1e-6)
