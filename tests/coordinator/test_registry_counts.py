"""The registry's own in-flight counts: put in the scheduler's index once a request, read
fresh by everyone (registry.py `index`, `_moved`)."""

from __future__ import annotations

import pytest

from coordinator.dispatch import Dispatcher
from tests.coordinator.test_dispatch import MODEL, Fleet, answer, drain, fleet, request, want

__all__ = ["fleet"]  # the fixture, used by name below


async def test_a_request_moves_its_nodes_slot_once_and_every_reader_sees_its_count(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """acquire and release leave the node's slot to be put when the index is next read (one
    put a request, not two); the index, the node's view and a snapshot still show the
    request in flight while it runs."""
    node = await fleet.node("a", answer)
    registry = fleet.registry
    conn = registry.get(node.name)
    assert conn is not None
    puts: list[str] = []
    put = registry._index.put
    monkeypatch.setattr(registry._index, "put",
                        lambda view, models=None: (puts.append(view.did), put(view, models)))
    registry.acquire(conn, MODEL)
    assert puts == []  # nothing read yet
    assert conn.view().models[MODEL].in_flight == 1
    slot = registry.index.slot(MODEL, node.name)
    assert slot is not None
    assert slot.model.in_flight == 1
    assert puts == [node.name]
    assert registry.snapshot().nodes[0].models[MODEL].in_flight == 1
    registry.release(conn, MODEL)
    served = await Dispatcher(registry).start(request(), want())  # reads the index: one put
    await drain(served)
    assert puts == [node.name, node.name]
    assert registry.index.slot(MODEL, node.name).model.in_flight == 0  # type: ignore[union-attr]
    assert conn.in_flight == 0
