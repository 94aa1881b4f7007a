"""A ledger row is journaled before the answer's last byte leaves and committed after: a
coordinator SIGKILLed the moment its answers were read has, once restarted, a row for every
one of them, exactly once; one stopped (SIGTERM) then has them all without a restart; and
the admin API's usage read right after an answer counts it (real processes, real store)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from coordinator.ledger_journal import JOURNAL_DIR, earlier_runs, read_segment
from coordinator.ledger_writer import LINGER_ENV
from coordinator.state import StateDir
from coordinator.store import Store, UsageRecord
from tests.e2e.evil_node import EvilNode, chunk, completion
from tests.e2e.mesh import Mesh, free_port
from tunnel import Frame, FrameType, Stream

pytestmark = pytest.mark.slow

USAGE = {"prompt_tokens": 2, "completion_tokens": 3}
HOLD_ROWS = {LINGER_ENV: "60000"}


async def _answers_then(tmp_path: Path, stop: signal.Signals) -> None:
    """8 answers (half streamed) read, then `stop` sent at once: every row is stored."""
    mesh = Mesh(root=tmp_path, api_port=free_port(), tunnel_port=free_port())
    try:
        # the writer holds journaled rows 60 s: the stop comes while they are only journaled
        await asyncio.to_thread(mesh.start_coordinator, env=HOLD_ROWS)
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
        journal = mesh.coord_state / JOURNAL_DIR
        journaled = {row["request_id"] for paths in earlier_runs(journal).values()
                     for path in paths for _, row in read_segment(path)}
        stored = {r.request_id for r in _rows(mesh)}
        if stop == signal.SIGTERM:  # a clean stop commits everything and leaves no journal
            assert (journaled, len(stored)) == (set(), 8)
            assert not list(journal.glob("*.lj"))
        else:  # killed: every row only journaled; a restart replays them (nothing twice)
            assert (journaled, stored) == ({f"kill-{i}" for i in range(8)}, set())
            await asyncio.to_thread(mesh.start_coordinator)
            assert mesh.coordinator is not None
            await asyncio.to_thread(mesh.coordinator.stop)
            assert not list(journal.glob("*.lj"))
        rows = _rows(mesh)
        assert sorted(r.request_id for r in rows) == sorted(f"kill-{i}" for i in range(8))
        assert all((r.prompt_tokens, r.completion_tokens, r.outcome) == (2, 3, "ok")
                   for r in rows)
    finally:
        mesh.stop()


def _rows(mesh: Mesh) -> list[UsageRecord]:
    store = Store(StateDir(mesh.coord_state).db_url)
    try:
        return store.usage_rows()
    finally:
        store.close()


async def test_sigkill_after_the_answers_loses_no_ledger_row(tmp_path: Path) -> None:
    await _answers_then(tmp_path, signal.SIGKILL)


async def test_a_clean_stop_after_the_answers_loses_no_ledger_row(tmp_path: Path) -> None:
    await _answers_then(tmp_path, signal.SIGTERM)


async def test_usage_read_right_after_an_answer_counts_it(tmp_path: Path) -> None:
    """Each answer, then at once the admin API's usage: it counts every answer so far (the
    read waits for the journaled rows to be committed, which the writer would otherwise
    hold 60 s), and so does /metrics."""
    mesh = Mesh(root=tmp_path, api_port=free_port(), tunnel_port=free_port())
    try:
        await asyncio.to_thread(mesh.start_coordinator, env=HOLD_ROWS)
        mesh.key = await asyncio.to_thread(mesh.make_key, "reader")
        admin = (mesh.coord_state / "admin.key").read_text().strip()
        node = await EvilNode.start(mesh, "fast", ["fast"])

        async def answer(stream: Stream, frame: Frame) -> None:
            await stream.send(FrameType.DATA, completion("hi", "fast"))
            await stream.send(FrameType.END, {"usage": USAGE})

        node.answer = answer
        await asyncio.to_thread(mesh.wait_serving, "fast", 10)
        base = f"http://127.0.0.1:{mesh.api_port}"
        async with httpx.AsyncClient(timeout=30) as client:
            for i in range(1, 6):
                reply = await client.post(
                    f"{mesh.api}/chat/completions",
                    headers={"Authorization": f"Bearer {mesh.key}"},
                    json={"model": "fast", "messages": [{"role": "user", "content": "x"}]})
                assert reply.status_code == 200
                usage = await client.get(f"{base}/admin/v1/usage?by=model",
                                         headers={"Authorization": f"Bearer {admin}"})
                assert usage.status_code == 200, usage.text
                assert usage.json()["total"]["requests"] == i
                assert usage.json()["total"]["completion_tokens"] == 3 * i
            metrics = (await client.get(f"{base}/metrics")).text
        await node.close()
        assert _metric_sum(metrics, "meshgate_coordinator_requests_total") == 5
        assert _metric_sum(metrics, "meshgate_coordinator_tokens_total") == 5 * (2 + 3)
    finally:
        mesh.stop()


def _metric_sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{"))
