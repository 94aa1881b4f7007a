"""A node is not trusted: what an enrolled but malicious node sends (usage claims, stream
bytes, request ids) is checked by a real coordinator process before it reaches a client, the
ledger or a log. The node is built on the real tunnel library (tests/e2e/evil_node.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.ledger_journal import JOURNAL_DIR
from coordinator.state import StateDir
from coordinator.store import Store, UsageRecord
from tests.e2e.evil_node import EvilNode, chunk, completion, drain
from tests.e2e.mesh import Mesh, mesh_at
from tunnel import FrameType

pytestmark = pytest.mark.slow

HELLO: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    for mesh in mesh_at(tmp_path_factory.mktemp("hostile")):
        mesh.start_coordinator()
        mesh.key = mesh.make_key("hostile")
        yield mesh


def size_of(path: Path) -> int:
    return path.stat().st_size


def ledger(mesh: Mesh, request_id: str) -> list[UsageRecord]:
    store = Store(StateDir(mesh.coord_state).db_url)
    try:
        journal = mesh.coord_state / JOURNAL_DIR  # rows not committed yet too
        return [r for r in store.usage_rows_durable(journal) if r.request_id == request_id]
    finally:
        store.close()


async def call(mesh: Mesh, model: str, request_id: str, *, stream: bool = False
               ) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            f"{mesh.api}/chat/completions",
            headers={"Authorization": f"Bearer {mesh.key}", "X-Request-Id": request_id},
            json={"model": model, "messages": HELLO, "stream": stream})


@pytest.mark.parametrize(("claim", "billed"), [
    (-5, 0),
    ("lots", 0),
    (2**64 - 1, 1_000_000_000),  # past int64 (msgpack carries up to uint64)
    (1e308, 1_000_000_000),
    (float("nan"), 0),
    ([1, 2], 0),
])
async def test_a_lying_usage_claim_is_clamped_and_billed(mesh: Mesh, claim: Any,
                                                         billed: int) -> None:
    model = f"liar-{abs(hash(repr(claim))) % 10**6}"
    evil = await EvilNode.start(mesh, model, [model])
    evil.reply = [(FrameType.DATA, completion("ok", model)),
                  (FrameType.END, {"usage": {"prompt_tokens": 3, "completion_tokens": claim}})]
    try:
        await asyncio.to_thread(mesh.wait_serving, model, 10)
        rid = f"usage-{model}"
        reply = await call(mesh, model, rid)
        assert reply.status_code == 200, reply.text
        (row,) = ledger(mesh, rid)  # journaled before the answer left: no waiting
        assert row.outcome == "ok"
        assert (row.prompt_tokens, row.completion_tokens) == (3, billed)
    finally:
        await evil.close()


async def test_a_usage_claim_in_a_stream_is_clamped_too(mesh: Mesh) -> None:
    evil = await EvilNode.start(mesh, "liar-stream", ["liar-stream"])
    evil.reply = [(FrameType.DATA, chunk("a")),
                  (FrameType.END, {"usage": {"prompt_tokens": "x", "completion_tokens": -1}})]
    try:
        await asyncio.to_thread(mesh.wait_serving, "liar-stream", 10)
        reply = await call(mesh, "liar-stream", "usage-stream", stream=True)
        assert reply.status_code == 200
        assert reply.text.endswith("data: [DONE]\n\n")
        (row,) = ledger(mesh, "usage-stream")
        assert (row.prompt_tokens, row.completion_tokens, row.outcome) == (0, 0, "ok")
    finally:
        await evil.close()


async def test_a_node_cannot_inject_sse_events(mesh: Mesh) -> None:
    evil = await EvilNode.start(mesh, "injector", ["injector"])
    injected = chunk("a")[:-1] + b'}\n\ndata: [DONE]\n\ndata: {"phish": 1}'
    evil.reply = [(FrameType.DATA, chunk("first")), (FrameType.DATA, injected),
                  (FrameType.DATA, chunk("after")), (FrameType.END, {"usage": None})]
    try:
        await asyncio.to_thread(mesh.wait_serving, "injector", 10)
        reply = await call(mesh, "injector", "inject-1", stream=True)
        events = [e for e in reply.text.split("\n\n") if e]
        assert len(events) == 2, events  # the honest first chunk, then an error event
        assert json.loads(events[0].removeprefix("data: "))["choices"]
        error = json.loads(events[1].removeprefix("data: "))["error"]
        assert error["code"] == "bad_node_output"
        assert "phish" not in reply.text
        assert "[DONE]" not in reply.text
        (row,) = ledger(mesh, "inject-1")
        assert row.outcome == "bad_node_output"
    finally:
        await evil.close()


async def test_a_first_chunk_that_is_not_one_json_object_is_a_failed_try(mesh: Mesh) -> None:
    evil = await EvilNode.start(mesh, "injector2", ["injector2"])
    evil.reply = [(FrameType.DATA, b"[DONE]\n\ndata: x"), (FrameType.END, {"usage": None})]
    try:
        await asyncio.to_thread(mesh.wait_serving, "injector2", 10)
        reply = await call(mesh, "injector2", "inject-2", stream=True)
        assert reply.status_code == 503  # no other candidate; the node's try failed
        assert "not one JSON object" in reply.json()["error"]["message"]
        assert "[DONE]" not in reply.text
    finally:
        await evil.close()


async def test_a_huge_request_id_from_a_node_is_refused_and_not_logged(mesh: Mesh) -> None:
    evil = await EvilNode.start(mesh, "chatty", ["chatty"])
    log = mesh.coordinator.log  # type: ignore[union-attr]
    before = await asyncio.to_thread(size_of, log)
    try:
        stream = await evil.ask({"model": "chatty", "messages": HELLO},
                                request_id="x" * 1_000_000)
        frames = await drain(stream)
        assert frames[-1].type == FrameType.ERROR
        assert frames[-1].body["status"] == 400
        assert "request_id" in frames[-1].body["message"]
        assert len(frames[-1].body["message"]) < 1000
        assert await asyncio.to_thread(size_of, log) - before < 5_000
    finally:
        await evil.close()
