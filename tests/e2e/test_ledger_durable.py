"""A ledger row is stored before the answer's last byte leaves: a coordinator SIGKILLed the
moment its answers were read has a row for every one of them, and so has one stopped
(SIGTERM) then (real process, real store)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from coordinator.state import StateDir
from coordinator.store import Store
from tests.e2e.evil_node import EvilNode, chunk, completion
from tests.e2e.mesh import Mesh, free_port
from tunnel import Frame, FrameType, Stream

pytestmark = pytest.mark.slow

USAGE = {"prompt_tokens": 2, "completion_tokens": 3}


async def _answers_then(tmp_path: Path, stop: signal.Signals) -> None:
    """8 answers (half streamed) read, then `stop` sent at once: every row is stored."""
    mesh = Mesh(root=tmp_path, api_port=free_port(), tunnel_port=free_port())
    try:
        await asyncio.to_thread(mesh.start_coordinator)
        mesh.key = await asyncio.to_thread(mesh.make_key, "durable")
        node = await EvilNode.start(mesh, "fast", ["fast"])

        async def answer(stream: Stream, frame: Frame) -> None:
            streaming = frame.body["stream"]
            await stream.send(FrameType.DATA, (chunk if streaming else completion)("hi", "fast"))
            await stream.send(FrameType.END, {"usage": USAGE})

        node.answer = answer
        await asyncio.to_thread(mesh.wait_serving, "fast", 10)
        async with httpx.AsyncClient(timeout=30) as client:
            replies = await asyncio.gather(*[client.post(
                f"{mesh.api}/chat/completions",
                headers={"Authorization": f"Bearer {mesh.key}", "X-Request-Id": f"kill-{i}"},
                json={"model": "fast", "stream": i % 2 == 1,
                      "messages": [{"role": "user", "content": "x"}]}) for i in range(8)])
        proc = mesh.coordinator
        assert proc is not None
        proc.popen.send_signal(stop)  # the moment the last answer was read
        await asyncio.to_thread(proc.popen.wait, 30)
        await node.close()
        assert all(r.status_code == 200 for r in replies)
        assert all(r.text.endswith("data: [DONE]\n\n") for r in replies[1::2])
        store = Store(StateDir(mesh.coord_state).db_url)
        try:
            rows = {r.request_id: r for r in store.usage_rows()}
        finally:
            store.close()
        assert sorted(rows) == sorted(f"kill-{i}" for i in range(8))
        assert all((r.prompt_tokens, r.completion_tokens, r.outcome) == (2, 3, "ok")
                   for r in rows.values())
    finally:
        mesh.stop()


async def test_sigkill_after_the_answers_loses_no_ledger_row(tmp_path: Path) -> None:
    await _answers_then(tmp_path, signal.SIGKILL)


async def test_a_clean_stop_after_the_answers_loses_no_ledger_row(tmp_path: Path) -> None:
    await _answers_then(tmp_path, signal.SIGTERM)
