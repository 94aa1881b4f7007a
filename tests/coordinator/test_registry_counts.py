"""The registry's own in-flight counts: put in the scheduler's index once a request, read
fresh by everyone (registry.py `index`, `_moved`)."""

from __future__ import annotations

import pytest

from coordinator.dispatch import Dispatcher
from tests.coordinator.dispatch_harness import MODEL, Fleet, answer, drain, fleet, request, want

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


async def test_a_request_that_came_and_went_puts_nothing_and_a_moved_count_or_rtt_does(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between two requests our counts are back where the index has them: the next read of
    the index puts no slot and rebuilds no view (registry.py `_still`). A count still moved
    (a request in flight), a decode rate we measured, or a new round trip is put."""
    node = await fleet.node("a", answer)
    registry = fleet.registry
    conn = registry.get(node.name)
    assert conn is not None
    registry.acquire(conn, MODEL)
    registry.release(conn, MODEL)
    before = registry.index.slot(MODEL, node.name)  # with the round trip measured so far
    puts: list[int] = []
    put = registry._index.put
    monkeypatch.setattr(registry._index, "put",
                        lambda view, models=None: (puts.append(
                            view.models[MODEL].in_flight), put(view, models)))
    for _ in range(3):  # one request after another
        registry.acquire(conn, MODEL)
        registry.release(conn, MODEL)
        assert registry.index.slot(MODEL, node.name) is before
    assert puts == []
    assert conn.view() is before.node  # type: ignore[union-attr]
    registry.acquire(conn, MODEL)  # in flight while the next request is scheduled
    assert registry.index.slot(MODEL, node.name).model.in_flight == 1  # type: ignore[union-attr]
    registry.release(conn, MODEL)
    assert registry.index.slot(MODEL, node.name).model.in_flight == 0  # type: ignore[union-attr]
    assert puts == [1, 0]
    registry.acquire(conn, MODEL)
    conn.seen(MODEL).finished(11, 0.5)  # a stream's measured decode rate: 20 tok/s
    registry.release(conn, MODEL)
    assert registry.index.slot(MODEL, node.name).model.decode_tps == 20.0  # type: ignore[union-attr]
    assert len(puts) == 3
    conn.link.conn.rtt_ms = (conn.rtt_ms or 0.0) + 5.0  # a new round trip (as a PONG sets it)
    registry.acquire(conn, MODEL)
    registry.release(conn, MODEL)
    slot = registry.index.slot(MODEL, node.name)
    assert slot is not None
    assert slot.node.rtt_ms == conn.rtt_ms
    assert len(puts) == 4
    assert registry.snapshot().nodes[0] == slot.node  # the same as a view built afresh
