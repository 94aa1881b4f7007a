"""The public API over dispatch: the real FastAPI app served by uvicorn on loopback, driven
by the `openai` client, with scripted nodes on real tunnels (see test_dispatch.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from coordinator.api import ApiContext, build_app
from coordinator.config import CoordinatorConfig, DispatchConfig
from coordinator.dispatch import Dispatcher
from coordinator.metrics import Metrics
from tests.coordinator.coordinator_harness import served
from tests.coordinator.dispatch_harness import (
    Fleet,
    answer,
    drop_link_after_data,
    fleet,
    hang_until_cancel,
    one_chunk_then_wait,
)

__all__ = ["fleet"]  # the fixture, imported for use here

KEY = "mg_test_key"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


class Api:
    def __init__(self, fleet: Fleet, config: CoordinatorConfig) -> None:
        self.rows: list[dict[str, Any]] = []
        self._row = asyncio.Event()
        self.ctx = ApiContext(
            fleet.registry,
            verify_key=lambda k: "key1" if k == KEY else None,
            known_models=lambda: {"m", "gone"},
            record_usage=self._record,
            config=config,
            dispatcher=Dispatcher(fleet.registry, config.dispatch),
            metrics=Metrics(),
        )
        self.url = ""

    def _record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._row.set()

    async def until_rows(self, count: int = 1) -> list[dict[str, Any]]:
        """The ledger rows, once `count` were written (fails after 5 s rather than hang)."""
        async with asyncio.timeout(5):
            while len(self.rows) < count:
                self._row.clear()
                await self._row.wait()
        return self.rows

    def client(self, **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url, api_key=KEY, max_retries=0, **kw)


@contextlib.asynccontextmanager
async def running(fleet: Fleet, config: CoordinatorConfig) -> AsyncIterator[Api]:
    api = Api(fleet, config)
    async with served(build_app(api.ctx)) as url:  # returns once uvicorn listens
        api.url = url + "/v1"
        yield api


CONFIG = CoordinatorConfig(
    aliases={"fast": ["small", "m"]},
    tasks={"summarize": ["fast"]},
)


async def test_a_task_route_runs_on_a_node_that_has_one_of_its_models(fleet: Fleet) -> None:
    node = await fleet.node("a", answer, models=("m",))
    async with running(fleet, CONFIG) as api:
        raw = await api.client().chat.completions.with_raw_response.create(
            model="qg://task=summarize;prefer=quality", messages=HELLO)
    assert raw.headers["x-meshgate-node"] == node.name
    assert node.requests[0]["model"] == "m"
    (row,) = await api.until_rows()
    assert (row["model"], row["outcome"], row["route"]) == ("m", "ok",
                                                            "qg://task=summarize;prefer=quality")


async def test_the_route_header_and_an_alias_work_together(fleet: Fleet) -> None:
    node = await fleet.node("a", answer, models=("small",))
    async with running(fleet, CONFIG) as api:
        raw = await api.client().chat.completions.with_raw_response.create(
            model="fast", messages=HELLO, extra_headers={"X-Meshgate-Route": "prefer=cost"})
    assert raw.headers["x-meshgate-node"] == node.name


async def test_route_errors_are_400_and_unknown_tasks_404(fleet: Fleet) -> None:
    await fleet.node("a", answer)
    async with running(fleet, CONFIG) as api:
        with pytest.raises(openai.BadRequestError, match="unknown policy 'fastest'"):
            await api.client().chat.completions.create(model="qg://model=m;prefer=fastest",
                                                       messages=HELLO)
        with pytest.raises(openai.NotFoundError, match="unknown task 'poetry'"):
            await api.client().chat.completions.create(model="qg://task=poetry",
                                                       messages=HELLO)
        with pytest.raises(openai.NotFoundError):
            await api.client().chat.completions.create(model="never-heard-of", messages=HELLO)


async def test_known_but_not_connected_is_a_503_in_the_ledger(fleet: Fleet) -> None:
    async with running(fleet, CONFIG) as api:
        with pytest.raises(openai.APIStatusError) as caught:
            await api.client().chat.completions.create(model="gone", messages=HELLO)
    assert caught.value.status_code == 503
    assert "gone" in str(caught.value)
    assert [r["outcome"] for r in await api.until_rows()] == ["no_capacity"]


async def test_a_full_queue_is_a_429_and_a_deadline_a_504(fleet: Fleet) -> None:
    await fleet.node("a", one_chunk_then_wait)
    config = CoordinatorConfig(dispatch=DispatchConfig(node_slots=1, queue_size=1))
    async with running(fleet, config) as api:
        client = api.client(timeout=10)
        hold = await client.chat.completions.create(model="m", messages=HELLO, stream=True)
        first = await anext(hold.__aiter__())
        assert first is not None
        waiting = asyncio.create_task(client.chat.completions.create(
            model="m", messages=HELLO, extra_headers={"X-Meshgate-Timeout": "1"}))
        await asyncio.sleep(0.3)
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            await client.chat.completions.create(model="m", messages=HELLO)
        with pytest.raises(openai.APIStatusError) as caught:
            await waiting
        assert caught.value.status_code == 504
        await hold.close()


async def test_a_node_lost_after_tokens_ends_the_stream_with_an_error_event(
    fleet: Fleet,
) -> None:
    await fleet.node("a", drop_link_after_data)
    async with running(fleet, CONFIG) as api:
        chunks: list[str] = []
        async with httpx.AsyncClient(timeout=10) as http, http.stream(
            "POST", f"{api.url}/chat/completions",
            json={"model": "m", "messages": HELLO, "stream": True},
            headers={"Authorization": f"Bearer {KEY}"},
        ) as reply:
            async for line in reply.aiter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
    assert chunks[0] == '{"i": 0}'
    error = json.loads(chunks[-1])["error"]
    assert "disconnected mid-response" in error["message"]
    assert "[DONE]" not in chunks
    assert [r["outcome"] for r in await api.until_rows()] == ["node_lost_mid_stream"]


async def test_a_client_that_goes_away_before_the_first_token_cancels_the_node(
    fleet: Fleet,
) -> None:
    node = await fleet.node("a", hang_until_cancel)
    async with running(fleet, CONFIG) as api:
        client = api.client(timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="m", messages=HELLO)
        await node.until_cancelled()
    assert node.cancelled == 1
    assert fleet.registry.get(node.name).in_flight == 0  # type: ignore[union-attr]
    assert [r["outcome"] for r in await api.until_rows()] == ["client_cancelled"]


async def test_a_client_that_leaves_a_started_whole_answer_has_one_row(fleet: Fleet) -> None:
    node = await fleet.node("a", one_chunk_then_wait)  # DATA, then no END: still collecting
    async with running(fleet, CONFIG) as api:
        with pytest.raises(openai.APITimeoutError):
            await api.client(timeout=0.5).chat.completions.create(model="m", messages=HELLO)
        await node.until_cancelled()
    assert node.cancelled == 1
    (row,) = await api.until_rows()  # the answer's row only: its 499 is not a second refusal row
    assert (row["node_did"], row["outcome"], row["status"]) == (node.name, "client_cancelled",
                                                               499)
    metrics = api.ctx.metrics
    assert metrics is not None
    counted = {(s.labels["status"], s.labels["route"]): s.value
               for m in metrics.requests.collect() for s in m.samples
               if s.name.endswith("_total")}
    assert counted == {("499", "node"): 1.0}  # counted once, as it ended


async def test_a_client_that_goes_away_mid_stream_cancels_the_node(fleet: Fleet) -> None:
    node = await fleet.node("a", one_chunk_then_wait)
    async with running(fleet, CONFIG) as api:
        stream = await api.client().chat.completions.create(
            model="m", messages=HELLO, stream=True)
        assert await anext(stream.__aiter__()) is not None
        await stream.close()
        await node.until_cancelled()
    assert node.cancelled == 1
    (row,) = await api.until_rows()
    assert (row["node_did"], row["outcome"]) == (node.name, "client_cancelled")
