"""Write pacing (coordinator/write_tick.py) in memory: a stream that wrote less than a tick
ago waits for the shared tick and what arrives meanwhile leaves in one write; the first
chunk and the end are never held; nothing is held while the coordinator keeps up. The tick
here is a named fake (`ManualTick`): engaged from the start, fired by the test, no timers.
Its lag rules (shared with the node's read pacing, meshgate/lag_tick.py):
tests/node/test_read_pacing.py. The settings, the metrics and the tests' hook are here too;
end to end: tests/e2e/test_write_tick_e2e.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator import write_tick
from coordinator.answer_stream import EventStream
from coordinator.config import ConfigError, StreamConfig, load_config, parse_config
from coordinator.metrics import Metrics
from coordinator.served import Served
from coordinator.server import pace_writes
from meshgate.lag_tick import LagTick
from meshgate.openai import OpenAIError
from meshgate.protocol import OpenRequest
from meshgate.startup import StartupError

END = None  # pushed after the last burst


class ManualTick(LagTick):
    """FAKE tick: paces from the first stream on with the tick given, fired by the test."""

    def __init__(self, tick_s: float = 0.05) -> None:
        super().__init__(streams=1)
        self.engaged = True
        self.fixed_tick_s = tick_s

    @property
    def tick_s(self) -> float:
        return self.fixed_tick_s

    def opened(self, loop: asyncio.AbstractEventLoop) -> None:
        self.open += 1  # no probe: the test says whether it runs behind

    def hold(self, held: Any, loop: asyncio.AbstractEventLoop, now: float) -> None:
        self._held.append(held)  # no timer: `fire` when the test says
        self.paused_reads += 1

    @property
    def waiting(self) -> int:
        return len(self._held)


class Pushed(Served):
    """An answer whose bursts the test pushes; what was pushed and not read yet is read in
    one batch, as `NodeAttempt.batches` drains a stream's queue; `end()` pushes the last
    burst and calls back as the tunnel stream does when END arrives."""

    gathers = True

    def __init__(self) -> None:
        super().__init__(OpenRequest("req_1", "chat/completions", "m", True, b"{}"), "m",
                         first=b'{"n":0}', started=0.0, tries=1, deadline=1e18,
                         idle_timeout=60.0)
        self.pending: list[list[bytes] | None] = []
        self.arrived = asyncio.Event()
        self.wake: Callable[[], None] | None = None

    def push(self, burst: list[bytes] | None) -> None:
        self.pending.append(burst)
        self.arrived.set()

    def end(self, burst: list[bytes]) -> None:
        self.push(burst)
        self.push(END)
        if self.wake is not None:
            self.wake()

    def queued(self) -> bool:
        return bool(self.pending)

    def on_end(self, wake: Callable[[], None] | None) -> None:
        self.wake = wake

    async def batches(self) -> AsyncGenerator[list[bytes], None]:
        while True:
            while not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
            batch: list[bytes] = []
            while self.pending:
                burst = self.pending.pop(0)
                if burst is END:
                    self.done = True
                    self.outcome = "ok"
                    yield batch
                    return
                batch += burst
            yield batch

    async def close(self) -> None:
        if not self.done:
            self.outcome = "client_cancelled"


class Writer:
    """One EventStream on `tick`, writing into `log`."""

    def __init__(self, tick: LagTick, answer: Pushed) -> None:
        self.log: list[Any] = []
        self.wrote = asyncio.Event()

        async def commit(row: dict[str, Any]) -> None:
            self.log.append(("row", row["outcome"]))

        self.stream = EventStream(answer, commit, "key1", None, include_usage=False,
                                  headers={})
        self.stream.tick = tick

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            self.log.append(message["body"])
            self.wrote.set()

    def start(self) -> asyncio.Task[None]:
        return asyncio.create_task(self.stream({"type": "http"}, Client().receive, self.send))

    async def next_write(self) -> None:
        self.wrote.clear()
        await self.wrote.wait()


class Client:
    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}


async def _spin(times: int = 10) -> None:
    for _ in range(times):  # loop iterations only: no time passes
        await asyncio.sleep(0)


async def test_a_stream_written_within_a_tick_waits_for_it_and_writes_once() -> None:
    tick, answer = ManualTick(), Pushed()
    writer = Writer(tick, answer)
    task = writer.start()
    await writer.next_write()
    assert writer.log == [b'data: {"n":0}\n\n']  # the first token: at once, never held
    answer.push([b'{"n":1}'])
    await _spin()
    assert tick.waiting == 1
    assert tick.held == 1
    answer.push([b'{"n":2}'])
    answer.push([b'{"n":3}'])
    await _spin()
    assert len(writer.log) == 1  # nothing written while it waits
    tick.fire()
    await writer.next_write()
    assert writer.log[1] == b'data: {"n":1}\n\ndata: {"n":2}\n\ndata: {"n":3}\n\n'  # one write
    answer.end([b'{"n":4}'])
    await asyncio.wait_for(task, 5)
    assert writer.log[2:] == [("row", "ok"), b'data: {"n":4}\n\ndata: [DONE]\n\n']
    assert tick.open == 0  # counted out


async def test_the_end_wakes_a_held_stream_at_once() -> None:
    tick, answer = ManualTick(), Pushed()
    writer = Writer(tick, answer)
    task = writer.start()
    await writer.next_write()
    answer.push([b'{"n":1}'])
    await _spin()
    assert tick.waiting == 1
    answer.end([b'{"n":2}'])  # END arrives before the tick: no waiting for it
    await asyncio.wait_for(task, 5)
    assert writer.log[1:] == [("row", "ok"),
                              b'data: {"n":1}\n\ndata: {"n":2}\n\ndata: [DONE]\n\n']
    assert tick.ticks == 0
    tick.fire()  # the tick that comes later finds it gone: nothing happens
    assert answer.wake is None  # and the stream no longer calls it back


async def test_a_stream_quiet_for_a_tick_and_a_coordinator_that_keeps_up_hold_nothing() -> None:
    # written a tick ago; a loop that keeps up (a probe runs, its lag is below 1 s)
    for tick in (ManualTick(tick_s=0.0), LagTick(streams=1, engage_s=1.0)):
        answer = Pushed()
        writer = Writer(tick, answer)
        task = writer.start()
        await writer.next_write()
        answer.push([b'{"n":1}'])
        await writer.next_write()  # after one loop turn, without any tick
        assert writer.log[-1] == b'data: {"n":1}\n\n'
        answer.end([b'{"n":2}'])
        await asyncio.wait_for(task, 5)
        assert tick.held == 0
        assert tick.ticks == 0


async def test_an_answer_read_a_chunk_a_pull_is_never_held() -> None:
    tick, answer = ManualTick(), Pushed()
    answer.gathers = False  # a cloud's stream: what comes meanwhile would not go along
    writer = Writer(tick, answer)
    task = writer.start()
    await writer.next_write()
    answer.push([b'{"n":1}'])
    await writer.next_write()  # within the tick, yet written after one loop turn
    assert writer.log[-1] == b'data: {"n":1}\n\n'
    answer.end([b'{"n":2}'])
    await asyncio.wait_for(task, 5)
    assert tick.held == 0
    assert tick.open == 0  # not counted either


async def test_a_first_chunk_with_more_behind_it_is_not_held() -> None:
    tick, answer = ManualTick(), Pushed()
    answer.push([b'{"n":1}'])  # more came with the first chunk: they leave together
    writer = Writer(tick, answer)
    task = writer.start()
    await writer.next_write()
    assert writer.log == [b'data: {"n":0}\n\ndata: {"n":1}\n\n']
    assert tick.held == 0
    answer.end([])
    await asyncio.wait_for(task, 5)


async def test_a_client_that_leaves_while_held_ends_the_stream_and_the_tick_shrugs() -> None:
    tick, answer = ManualTick(), Pushed()
    writer = Writer(tick, answer)
    task = writer.start()
    await writer.next_write()
    answer.push([b'{"n":1}'])
    await _spin()
    assert tick.waiting == 1
    task.cancel()  # as the server does when the connection is lost
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ("row", "client_cancelled") in writer.log
    assert tick.open == 0
    tick.fire()  # resumes nobody


async def test_an_error_after_the_start_ends_a_held_stream_at_once() -> None:
    tick = ManualTick()

    class Failing(Pushed):
        async def batches(self) -> AsyncGenerator[list[bytes], None]:
            async for batch in super().batches():
                yield batch
            raise OpenAIError(502, "the node cancelled the request", hop="node")

    answer = Failing()
    writer = Writer(tick, answer)
    task = writer.start()
    await writer.next_write()
    answer.push([b'{"n":1}'])
    await _spin()
    assert tick.waiting == 1
    answer.pending.append(END)  # an ERROR frame: the tunnel stream calls back as for END
    assert answer.wake is not None
    answer.wake()
    answer.arrived.set()
    await asyncio.wait_for(task, 5)
    body = b"".join(part for part in writer.log if isinstance(part, bytes))
    assert body.startswith(b'data: {"n":0}\n\ndata: {"n":1}\n\ndata: {"error": ')


async def test_chunks_read_with_an_error_behind_them_are_not_held_but_go_before_it() -> None:
    tick = ManualTick()

    class Failing(Pushed):
        async def batches(self) -> AsyncGenerator[list[bytes], None]:
            self.outcome = "error_after_start"  # as NodeAttempt: the ERROR frame was read
            yield [b'{"n":1}']  # with the chunks before it, a moment after the first write
            raise OpenAIError(502, "the node cancelled the request", hop="node")

        @property
        def ending(self) -> bool:
            return self.outcome == "error_after_start"

    answer = Failing()
    writer = Writer(tick, answer)
    await asyncio.wait_for(writer.start(), 5)  # the tick never fires: nothing waits for it
    assert tick.held == 0
    body = b"".join(part for part in writer.log if isinstance(part, bytes))
    assert body.startswith(b'data: {"n":0}\n\ndata: {"n":1}\n\ndata: {"error": ')


def test_the_metrics_show_write_pacing() -> None:
    tick = ManualTick()
    tick.open, tick.paused_reads, tick.ticks, tick.engagements = 20, 7, 3, 1
    text = Metrics(write_tick=tick).render().decode()
    for line in ("meshgate_coordinator_write_pacing_engaged 1.0",
                 "meshgate_coordinator_write_pacing_tick_seconds 0.05",
                 "meshgate_coordinator_write_pacing_streams 20.0",
                 "meshgate_coordinator_write_pacing_held_writes_total 7.0",
                 "meshgate_coordinator_write_pacing_ticks_total 3.0",
                 "meshgate_coordinator_write_pacing_engagements_total 1.0"):
        assert line in text.splitlines()
    tick.engaged = False
    text = Metrics(write_tick=tick).render().decode()
    assert "meshgate_coordinator_write_pacing_tick_seconds 0.0" in text.splitlines()
    assert "write_pacing" not in Metrics(write_tick=None).render().decode()


def test_stream_settings_are_checked_and_reach_the_process_tick(tmp_path: Path) -> None:
    assert parse_config({}).stream == StreamConfig(50.0, 2.0, 16)
    got = parse_config({"stream": {"tick_ms": 20, "tick_engage_ms": 5, "tick_streams": 64}})
    assert got.stream == StreamConfig(20.0, 5.0, 64)
    for table, says in (({"tick_ms": -1}, "stream.tick_ms: must be zero or more"),
                        ({"tick_ms": 1001}, "stream.tick_ms: at most 1000"),
                        ({"tick_streams": 0}, "stream.tick_streams: expected 1 or more"),
                        ({"tick_streams": 2.5}, "stream.tick_streams: expected a whole number"),
                        ({"tick_engage_ms": "soon"}, "stream.tick_engage_ms: expected a number"),
                        ({"tick": 5}, "stream: unknown key 'tick'")):
        with pytest.raises(ConfigError, match=says):
            parse_config({"stream": table})
    path = tmp_path / "coordinator.toml"
    path.write_text("[stream]\ntick_ms = 0\n")
    config = load_config(path)
    tick = write_tick.WRITE_TICK
    before = (tick.cap_s, tick.engage_s, tick.streams, tick.fixed_lag_s)
    try:
        pace_writes(config)
        assert not tick.on  # 0: off
        pace_writes(got)
        assert (tick.cap_s, tick.engage_s, tick.streams) == (0.02, 0.005, 64)
    finally:
        tick.configure(*before)


def test_the_tests_lag_hook_is_read_and_a_bad_one_stops_the_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert write_tick.fixed_lag({}) is None
    assert write_tick.fixed_lag({"MESHGATE_COORDINATOR_LAG_MS": "50"}) == 0.05
    tick = write_tick.WRITE_TICK
    before = (tick.cap_s, tick.engage_s, tick.streams, tick.fixed_lag_s)
    try:
        monkeypatch.setenv("MESHGATE_COORDINATOR_LAG_MS", "soon")
        with pytest.raises(StartupError, match="MESHGATE_COORDINATOR_LAG_MS='soon'"):
            pace_writes(parse_config({}))
    finally:
        tick.configure(*before)
