"""The answer's way out: a client that leaves is noticed at once (no polling), SSE bursts
leave in one write, and the ledger row is stored before the last bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from coordinator.answer_stream import EventStream, Watch, unless_disconnected
from coordinator.served import Served
from meshgate.http_protocols import CLIENT_GONE, ClientGone
from meshgate.openai import OpenAIError
from meshgate.protocol import OpenRequest


class Client:
    """The ASGI receive side: the body was read; `leave()` disconnects."""

    def __init__(self) -> None:
        self.left = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.left.wait()
        return {"type": "http.disconnect"}


async def _spin(times: int = 5) -> None:
    for _ in range(times):  # loop iterations only: no time passes
        await asyncio.sleep(0)


async def test_a_client_that_leaves_cancels_the_work_at_once() -> None:
    client = Client()
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def request() -> None:
        async with unless_disconnected(client.receive):
            await work()

    task = asyncio.create_task(request())
    await _spin()
    started = asyncio.get_running_loop().time()
    client.left.set()
    await _spin()
    assert task.done()
    assert cancelled.is_set()
    with pytest.raises(OpenAIError) as caught:
        task.result()
    assert caught.value.status == 499
    assert asyncio.get_running_loop().time() - started < 0.1  # not a 0.5 s poll


async def test_work_that_finishes_first_returns_and_leaves_no_watcher() -> None:
    client = Client()
    before = len(asyncio.all_tasks())
    async with unless_disconnected(client.receive):
        await asyncio.sleep(0)
    await _spin()
    assert len(asyncio.all_tasks()) == before
    client.left.set()  # too late to matter
    await _spin()


async def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    client = Client()

    async def request() -> None:
        async with unless_disconnected(client.receive):
            await asyncio.Event().wait()

    task = asyncio.create_task(request())
    await _spin()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_one_watch_guards_several_waits_with_one_waiter() -> None:
    client = Client()
    before = len(asyncio.all_tasks())
    watch = Watch(client.receive)
    assert len(asyncio.all_tasks()) == before + 1
    with watch:
        await asyncio.sleep(0)
    with watch:  # the same waiter, armed again
        await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before + 1
    client.left.set()  # it leaves between two waits: no cancel lands outside them
    await _spin()
    with pytest.raises(OpenAIError) as caught, watch:  # the next wait is refused at once
        pytest.fail("entered a wait for a client that left")
    assert caught.value.status == 499
    watch.stop()
    await _spin()
    assert len(asyncio.all_tasks()) == before


async def test_a_watch_on_the_servers_connection_callbacks_needs_no_task() -> None:
    gone = ClientGone()
    before = len(asyncio.all_tasks())
    watch = Watch(Client().receive, {CLIENT_GONE: gone})
    assert len(asyncio.all_tasks()) == before  # no waiter: the protocol calls back
    waiting = asyncio.Event()

    async def dispatch() -> None:
        with watch:
            waiting.set()
            await asyncio.Event().wait()  # a dispatch that would never end

    task = asyncio.create_task(dispatch())
    await waiting.wait()
    gone.fire()  # the connection is lost mid-wait: the request's task is cancelled at once
    with pytest.raises(OpenAIError) as caught:
        await task
    assert caught.value.status == 499
    watch.stop()
    late = Watch(Client().receive, {CLIENT_GONE: gone})  # lost before it was watched
    with pytest.raises(OpenAIError), late:
        pytest.fail("entered a wait for a client that left")
    late.stop()
    kept = ClientGone()
    stopped = Watch(Client().receive, {CLIENT_GONE: kept})
    stopped.stop()  # a finished request no longer hears of its connection
    kept.fire()
    assert not stopped.gone


class Answer(Served):
    """A served answer whose chunks come in the bursts given; `hold` pauses after them.

    The first `ready` bursts had arrived with the first chunk; each later one arrives a
    few loop turns after the one before was read, or in the next turn if its index is in
    `soon` (while the writer lets the loop turn before a write)."""

    def __init__(self, bursts: list[list[bytes]], *, hold: bool = False, ready: int = 1,
                 soon: frozenset[int] = frozenset()) -> None:
        super().__init__(OpenRequest("req_1", "chat/completions", "m", True, b"{}"), "m",
                         first=b'{"n":0}', started=0.0, tries=1, deadline=1e18,
                         idle_timeout=60.0)
        self.bursts = bursts
        self.hold = hold
        self.closed = 0
        self.ready = ready
        self.soon = soon
        self.read = 0

    def queued(self) -> bool:
        return self.read < min(self.ready, len(self.bursts))

    def _arrive(self) -> None:
        self.ready += 1

    async def batches(self) -> AsyncGenerator[list[bytes], None]:
        for i, burst in enumerate(self.bursts):
            while i >= self.ready:
                await _spin(3)
                self.ready = max(self.ready, i + 1)
            if i == len(self.bursts) - 1 and not self.hold:
                self.done = True
                self.outcome = "ok"
            self.read = i + 1
            if i + 1 in self.soon:
                asyncio.get_running_loop().call_soon(self._arrive)
            yield burst
        if self.hold:
            await asyncio.Event().wait()

    async def close(self) -> None:
        self.closed += 1
        if not self.done:
            self.outcome = "client_cancelled"


def _stream(answer: Answer, log: list[Any]) -> EventStream:
    async def commit(row: dict[str, Any]) -> None:
        log.append(("row", row["outcome"]))

    return EventStream(answer, commit, "key1", None, include_usage=False,
                       headers={"x-request-id": "req_1"})


async def test_bursts_leave_whole_and_the_row_is_stored_before_the_last_bytes() -> None:
    log: list[Any] = []
    answer = Answer([[b'{"n":1}', b'{"n":2}'], [b'{"n":3}']])

    async def send(message: dict[str, Any]) -> None:
        log.append((message["type"], message.get("body"), message.get("more_body")))

    await _stream(answer, log)({"type": "http"}, Client().receive, send)
    assert log == [
        ("http.response.start", None, None),
        # more had arrived with the first chunk: it waits for the burst
        ("http.response.body", b'data: {"n":0}\n\ndata: {"n":1}\n\ndata: {"n":2}\n\n', True),
        ("row", "ok"),  # stored before the last burst and [DONE], which end the response
        ("http.response.body", b'data: {"n":3}\n\ndata: [DONE]\n\n', False),
    ]
    assert answer.closed == 1


async def test_what_arrives_while_the_loop_turns_once_goes_in_the_same_write() -> None:
    log: list[Any] = []
    answer = Answer([[b'{"n":1}'], [b'{"n":2}'], [b'{"n":3}'], [b'{"n":4}']], ready=0,
                    soon=frozenset({1}))

    async def send(message: dict[str, Any]) -> None:
        log.append((message["type"], message.get("body"), message.get("more_body")))

    await _stream(answer, log)({"type": "http"}, Client().receive, send)
    assert log == [
        ("http.response.start", None, None),
        ("http.response.body", b'data: {"n":0}\n\n', True),  # the first token: at once
        # 2 came in the loop turn before 1's write: one write for both
        ("http.response.body", b'data: {"n":1}\n\ndata: {"n":2}\n\n', True),
        ("http.response.body", b'data: {"n":3}\n\n', True),  # nothing came: alone
        ("row", "ok"),
        ("http.response.body", b'data: {"n":4}\n\ndata: [DONE]\n\n', False),
    ]


async def test_a_client_that_leaves_mid_stream_ends_it_quietly_with_its_row() -> None:
    log: list[Any] = []
    client = Client()
    answer = Answer([[b'{"n":1}']], hold=True)

    async def send(message: dict[str, Any]) -> None:
        log.append((message["type"], message.get("more_body")))

    task = asyncio.create_task(_stream(answer, log)({"type": "http"}, client.receive, send))
    await _spin()
    assert ("http.response.body", True) in log
    client.left.set()
    await asyncio.wait_for(task, 5)  # returns: no exception for the server to log
    assert ("row", "client_cancelled") in log
    assert answer.closed == 1


class Refused(Answer):
    """The first chunk came with a bad one behind it: the stream ends with an error."""

    def queued(self) -> bool:
        return True

    async def batches(self) -> AsyncGenerator[list[bytes], None]:
        raise OpenAIError(502, "node sent a malformed answer", code="bad_node_output")
        yield []  # an async generator


async def test_chunks_held_when_the_stream_fails_leave_before_its_error_event() -> None:
    sent: list[bytes] = []
    answer = Refused([])

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            sent.append(message["body"])

    await _stream(answer, [])({"type": "http"}, Client().receive, send)
    body = b"".join(sent)
    assert body.startswith(b'data: {"n":0}\n\ndata: {"error": ')
    assert b"bad_node_output" in body
    assert b"[DONE]" not in body
