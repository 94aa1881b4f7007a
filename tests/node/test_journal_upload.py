"""The journal upload over a real loopback tunnel into the coordinator's ingest (a real
SQLite store): rows let go only once the coordinator has them; a refusal keeps them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from coordinator.ingest import node_streams
from coordinator.store import Store
from meshgate.openai import OpenAIError
from node_agent.journal import UsageJournal
from node_agent.journal_upload import upload_batch
from tests.tunnel.mux_pair import Pair, mux_pair
from tunnel import Frame, Stream

DID = "did:key:z6MkUploader"


def row(i: int, **over: Any) -> dict[str, Any]:
    return {"request_id": f"off_{i}", "model": "smollm2", "endpoint": "chat/completions",
            "prompt_tokens": 3, "completion_tokens": 2, "latency_ms": 10.0, "outcome": "ok",
            "created_at": 1.0, "joules": 1.5, **over}


class Rig:
    def __init__(self, pair: Pair, store: Store, journal: UsageJournal) -> None:
        self.pair, self.store, self.journal = pair, store, journal


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    node = SimpleNamespace(did=DID)

    async def not_a_request(_: Any, stream: Stream, frame: Frame) -> None:
        raise AssertionError(f"a journal upload was taken for a request: {frame.body!r}")

    handler = node_streams(store, None, not_a_request)

    async def on_stream(stream: Stream, frame: Frame) -> None:
        await handler(node, stream, frame)  # type: ignore[arg-type]

    pair = await mux_pair(coord_on_stream=on_stream)
    try:
        yield Rig(pair, store, UsageJournal(tmp_path / "node"))
    finally:
        await pair.close()
        store.close()


async def test_rows_are_let_go_only_after_the_coordinator_has_them(rig: Rig) -> None:
    for i in range(3):
        rig.journal.append(row(i))
    assert await upload_batch(rig.journal, rig.pair.node_mux, limit=2) == 2
    assert rig.journal.has_pending()
    assert [r.request_id for r in rig.store.usage_rows()] == ["off_0", "off_1"]
    assert await upload_batch(rig.journal, rig.pair.node_mux) == 1
    assert not rig.journal.has_pending()
    rows = rig.store.usage_rows()
    assert {(r.node_did, r.route, r.joules) for r in rows} == {(DID, "offline", 1.5)}
    assert await upload_batch(rig.journal, rig.pair.node_mux) == 0


async def test_a_batch_sent_twice_is_counted_once(rig: Rig) -> None:
    rig.journal.append(row(0))
    rows, _ = rig.journal.pending()
    again = UsageJournal(rig.journal.path.parent / "copy")  # the same rows, not yet confirmed
    for r in rows:
        again.append(r)
    await upload_batch(rig.journal, rig.pair.node_mux)
    await upload_batch(again, rig.pair.node_mux)
    assert len(rig.store.usage_rows()) == 1
    assert not again.has_pending()


async def test_a_refused_upload_keeps_the_rows(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def database_down(_: Any) -> Any:
        raise OperationalError("INSERT", {}, Exception("connection refused"))

    monkeypatch.setattr(rig.store, "ingest_usage", database_down)
    rig.journal.append(row(0))
    with pytest.raises(OpenAIError) as refused:
        await upload_batch(rig.journal, rig.pair.node_mux)
    assert refused.value.status == 503
    assert rig.journal.has_pending()


async def test_bad_rows_are_left_out_and_the_good_ones_kept(rig: Rig) -> None:
    rig.journal.append(row(0, prompt_tokens=-5))
    rig.journal.append(row(1))
    assert await upload_batch(rig.journal, rig.pair.node_mux) == 2
    assert [r.request_id for r in rig.store.usage_rows()] == ["off_1"]
    assert not rig.journal.has_pending()
