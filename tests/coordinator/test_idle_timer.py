"""coordinator/served.py's IdleTimer: each wait of a stream bounded by its own limit, one
loop timer for all of them (not one per frame), cancellations that are not its own left
alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coordinator.served import IdleTimer

pytestmark = pytest.mark.timeout(30)


def counting_timers(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The times of every loop timer set from now on."""
    loop = asyncio.get_running_loop()
    made: list[float] = []
    call_at = loop.call_at

    def counted(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        made.append(when)
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counted)
    return made


async def test_many_waits_in_time_set_one_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    made = counting_timers(monkeypatch)
    timer = IdleTimer()
    loop = asyncio.get_running_loop()
    for n in range(200):
        ready = loop.create_future()
        loop.call_soon(ready.set_result, n)
        assert await timer.wait(ready, 60.0) == n
    timer.close()
    assert len(made) == 1


async def test_a_wait_past_its_limit_is_a_timeout_and_the_task_is_not_left_cancelled() -> None:
    timer = IdleTimer()
    loop = asyncio.get_running_loop()
    assert await timer.wait(asyncio.sleep(0, "quick"), 0.05) == "quick"
    never: asyncio.Future[None] = loop.create_future()
    with pytest.raises(TimeoutError):
        await timer.wait(never, 0.05)
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0
    assert never.cancelled()
    assert await timer.wait(asyncio.sleep(0, "after"), 0.05) == "after"  # still usable
    timer.close()


async def test_a_timer_set_by_an_earlier_wait_does_not_end_a_later_one_early() -> None:
    """The first wait's timer fires while a later wait (with the same limit) is younger
    than its limit: the later wait goes on and ends with its result."""
    timer = IdleTimer()
    loop = asyncio.get_running_loop()
    first: asyncio.Future[str] = loop.create_future()
    loop.call_later(0.5, first.set_result, "first")
    assert await timer.wait(first, 1.0) == "first"
    second: asyncio.Future[str] = loop.create_future()
    loop.call_later(0.75, second.set_result, "second")  # past the first wait's end (1.0)
    assert await timer.wait(second, 1.0) == "second"
    timer.close()


async def test_a_cancellation_not_its_own_goes_through() -> None:
    timer = IdleTimer()
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    async def waiting() -> None:
        never: asyncio.Future[None] = loop.create_future()
        started.set()
        await timer.wait(never, 60.0)

    task = asyncio.create_task(waiting())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    timer.close()
