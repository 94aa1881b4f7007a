"""What the gateway writes to the store for a fleet: batched, one transaction a flush.

A real Gateway on a real SQLite store; `heard` is what the gateway calls when an
inventory or a (every TOUCH_EVERY_S) telemetry frame arrives. The store's
statements are counted with SQLAlchemy's own `after_cursor_execute` event.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from coordinator.gateway import Gateway
from coordinator.live import DUTY, STALE_PERIODS, paced
from coordinator.registry import Registry
from coordinator.store import Store

NOW = 1_800_000_000.0


def enroll(store: Store, n: int) -> list[str]:
    token_id, secret = store.create_token(3600, {}, NOW, uses=n)
    dids = [f"did:key:z6MkNODE{i:04}" for i in range(n)]
    for did in dids:
        store.redeem_token(token_id, secret, did, NOW)
    return dids


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    yield store
    store.close()


def count_updates(store: Store) -> list[str]:
    seen: list[str] = []

    def on_execute(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE NODES"):
            seen.append(statement)

    event.listen(store.engine, "after_cursor_execute", on_execute)
    return seen


async def test_a_fleet_heard_from_costs_one_write_per_flush_not_one_per_node(
    store: Store,
) -> None:
    dids = enroll(store, 200)
    gateway = Gateway(store, Registry())
    updates = count_updates(store)
    for i, did in enumerate(dids):
        gateway.heard(did, NOW + i, ["m-a", "m-b"] if i % 2 else None)
    assert await gateway.flush_seen() == 200
    assert len(updates) == 2  # one executemany for the nodes with models, one without
    records = {r.did: r for r in store.list_nodes()}
    assert records[dids[7]].last_seen == NOW + 7
    assert records[dids[7]].models == ["m-a", "m-b"]
    assert records[dids[8]].last_seen == NOW + 8
    assert records[dids[8]].models == []
    assert await gateway.flush_seen() == 0  # nothing new heard: nothing written
    assert len(updates) == 2


async def test_telemetry_after_an_unwritten_inventory_keeps_its_models(store: Store) -> None:
    (did,) = enroll(store, 1)
    gateway = Gateway(store, Registry())
    gateway.heard(did, NOW, ["smollm2"])
    gateway.heard(did, NOW + 10)  # a telemetry frame before the flush
    await gateway.flush_seen()
    (record,) = store.list_nodes()
    assert (record.last_seen, record.models) == (NOW + 10, ["smollm2"])


class FailingOnce(Store):
    """A real store whose first batched write fails as a database outage would."""

    failed = False

    def touch_nodes(self, seen: Any) -> None:
        if not self.failed:
            self.failed = True
            raise OSError("database unreachable")
        super().touch_nodes(seen)


async def test_what_a_failed_flush_held_is_written_by_the_next(tmp_path: Path) -> None:
    store = FailingOnce(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        (did,) = enroll(store, 1)
        gateway = Gateway(store, Registry())
        gateway.heard(did, NOW, ["smollm2"])
        with pytest.raises(OSError, match="unreachable"):
            await gateway.flush_seen()
        assert await gateway.flush_seen() == 1
        (record,) = store.list_nodes()
        assert (record.last_seen, record.models) == (NOW, ["smollm2"])
    finally:
        store.close()


class Signalling(Store):
    """A real store that says when a batched write went through."""

    written = threading.Event()

    def touch_nodes(self, seen: Any) -> None:
        super().touch_nodes(seen)
        if seen:
            self.written.set()


async def test_the_flush_loop_writes_on_its_period_and_once_more_when_stopped(
    tmp_path: Path,
) -> None:
    store = Signalling(f"sqlite:///{tmp_path / 'c.db'}")
    a, b = enroll(store, 2)
    gateway = Gateway(store, Registry())
    task = asyncio.create_task(gateway.flush_seen_loop(period=0.05))
    gateway.heard(a, NOW, ["m"])
    assert await asyncio.to_thread(store.written.wait, 5)
    assert store.get_node(a).models == ["m"]  # type: ignore[union-attr]
    gateway.heard(b, NOW + 1, ["n"])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = store.get_node(b)
    store.close()
    assert record is not None
    assert record.models == ["n"]


async def test_known_models_are_read_again_only_after_new_models_were_written(
    store: Store,
) -> None:
    a, b = enroll(store, 2)
    store.touch_node(a, NOW, ["old-model"])
    gateway = Gateway(store, Registry())
    selects: list[str] = []
    event.listen(store.engine, "after_cursor_execute",
                 lambda _c, _k, statement, *_: selects.append(statement)
                 if "FROM nodes" in statement else None)
    assert gateway.known_models() == {"old-model"}
    for _ in range(100):  # requests for a made-up model, one after the other
        assert "made-up" not in gateway.known_models()
    assert len(selects) == 1
    gateway.heard(b, NOW, ["new-model"])
    assert "new-model" in gateway.known_models()  # heard, not yet written: known already
    await gateway.flush_seen()
    assert gateway.known_models() == {"old-model", "new-model"}
    assert len(selects) == 2


def test_the_live_file_is_written_less_often_only_when_writing_it_costs_more() -> None:
    assert paced(2.0, 0.001, 2.0) == 2.0  # a small fleet: every 2 s
    assert paced(2.0, 0.05, 2.0) == 0.05 * DUTY  # 50 ms to write: at most 1/DUTY of a core
    assert DUTY >= 100  # at most 1% of a core
    # a jump in cost grows the period in steps a reader never sees as stale
    assert paced(2.0, 10.0, 2.0) == 2.0 * (STALE_PERIODS - 1)
    assert paced(2.0, 0.001, 8.0) == 2.0  # cheap again: back to the period asked
