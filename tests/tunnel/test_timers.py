"""`TimerWheel`: many links' ping deadlines on one loop timer a tick (tunnel/timers.py).

A waker fires once its deadline's tick came, never before its deadline and at most one
grain after it; wakers due in the same tick share one loop timer; a waker set again
waits for its new deadline only; one discarded is not woken. Then the server's links
use one wheel (tunnel/ws.py `serve`): the real loop, real sockets.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.tunnel.mux_pair import mux_pair
from tunnel.timers import TimerWheel

GRAIN = 0.05


class Waker:
    def __init__(self, name: str, fired: list[tuple[str, float]], done: asyncio.Event,
                 last: bool = False) -> None:
        self.name, self.fired, self.done, self.last = name, fired, done, last

    def _on_timer(self) -> None:
        self.fired.append((self.name, time.monotonic()))
        if self.last:
            self.done.set()


async def test_wakers_fire_in_their_ticks_never_early_at_most_a_grain_late(
        monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_later = loop.call_later

    def counted(delay: float, *args: object) -> asyncio.TimerHandle:
        timers.append(delay)
        return call_later(delay, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "call_later", counted)
    wheel = TimerWheel(GRAIN)
    fired: list[tuple[str, float]] = []
    done = asyncio.Event()
    start = time.monotonic()
    base = (int(start / GRAIN) + 4) * GRAIN  # a tick boundary ahead
    # deadlines mid-tick (a boundary's float rounding must not decide the tick)
    due = {"a": base + 0.01, "b": base + 0.02, "c": base + 0.21, "gone": base + 0.11,
           "moved": base + 0.03}
    wakers = {name: Waker(name, fired, done, last=name == "c") for name in due}
    for name, deadline in due.items():
        wheel.set(wakers[name], deadline)
    assert len(timers) == 3  # a, b and moved share a tick: one loop timer for the three
    wheel.set(wakers["moved"], base + 0.16)  # set again: only the new deadline counts
    assert len(timers) == 4
    wheel.discard(wakers["gone"])
    assert len(wheel) == 4
    await asyncio.wait_for(done.wait(), 5)
    assert [name for name, _ in fired] == ["a", "b", "moved", "c"]
    deadline = {**due, "moved": base + 0.16}
    for name, at in fired:
        assert at >= deadline[name] - 0.002  # the loop's clock resolution, no more
        assert at <= deadline[name] + GRAIN + 1.0  # a loaded box: late by the loop only
    assert len(wheel) == 0
    await asyncio.sleep(GRAIN * 3)  # the moved and discarded ones' old ticks: nobody
    assert [name for name, _ in fired] == ["a", "b", "moved", "c"]


async def test_a_waker_that_sets_itself_again_when_fired_is_woken_again() -> None:
    wheel = TimerWheel(GRAIN)
    count = 0
    done = asyncio.Event()

    class Again:
        def _on_timer(self) -> None:
            nonlocal count
            count += 1
            if count < 3:
                wheel.set(self, time.monotonic())  # due at once: the next tick
            else:
                done.set()

    wheel.set(Again(), time.monotonic())
    await asyncio.wait_for(done.wait(), 5)
    assert count == 3
    assert len(wheel) == 0


def test_a_wheel_needs_a_positive_grain() -> None:
    with pytest.raises(ValueError, match="grain"):
        TimerWheel(0.0)


async def test_a_servers_links_share_one_wheel_and_a_closed_link_leaves_it() -> None:
    pair = await mux_pair(ping_interval=0.2, ping_timeout=1.0)
    try:
        wheel = pair.coord_link._timers
        assert wheel is not None
        assert wheel.grain == pytest.approx(0.02)  # a tenth of the ping interval
        assert wheel.waiting(pair.coord_link)
        assert pair.node_link._timers is None  # a node's one link: a timer of its own
        await asyncio.wait_for(pair.coord_link.ping(wait=True), 5)
        assert pair.coord_link.rtt_ms is not None
    finally:
        await pair.close()
    assert not wheel.waiting(pair.coord_link)
