"""A node's reported load still holds our requests that ended since its last report (a
delta comes <= 100 ms after the node's own release, which follows its answer). The
registry takes those off: a client's next request right after an answer finds the node
free, not busy with the request it just got (which made one-slot nodes look twice as slow
to sequential clients and sent them to cold nodes)."""

from __future__ import annotations

from coordinator.registry import NodeConn
from meshgate.node_messages import LoadDelta, ModelLoad, Telemetry, parse_telemetry
from tests.coordinator.dispatch_harness import MODEL, Fleet, answer, fleet

__all__ = ["fleet"]  # the fixture, used by name below


def depth(conn: NodeConn) -> int:
    return conn.view().models[MODEL].queue_depth


def report(in_flight: int) -> LoadDelta:
    return LoadDelta(delta=True, models={MODEL: ModelLoad(in_flight=in_flight)})


async def test_our_request_that_ended_is_not_counted_again_from_the_nodes_report(
        fleet: Fleet) -> None:
    node = await fleet.node("a", answer, decode_tps=50.0)
    registry, conn = fleet.registry, fleet.registry.get(node.name)
    assert conn is not None
    registry.acquire(conn, MODEL)
    registry.apply_delta(conn, report(1))  # the node counts it too
    assert depth(conn) == 1
    registry.release(conn, MODEL)
    assert conn.load[MODEL].in_flight == 1  # its report, not yet followed by the next
    assert depth(conn) == 0
    first = next(iter(registry.index.ordered(MODEL)))
    assert first.model.queue_depth == 0  # the index orders by the same view

    registry.apply_delta(conn, report(1))  # a later report: one of its own clients'
    assert depth(conn) == 1


async def test_a_full_report_after_our_release_counts_again(fleet: Fleet) -> None:
    node = await fleet.node("a", answer, decode_tps=50.0)
    registry, conn = fleet.registry, fleet.registry.get(node.name)
    assert conn is not None
    registry.acquire(conn, MODEL)
    registry.apply_delta(conn, report(2))  # ours and a local client's
    registry.release(conn, MODEL)
    assert depth(conn) == 1  # the local client's
    telemetry = parse_telemetry({**conn.telemetry, "runtime": {MODEL: {
        "decode_tps": 50.0, "prefill_tps": 50.0, "in_flight": 2}}})
    assert isinstance(telemetry, Telemetry)
    registry.set_telemetry(conn, telemetry, conn.telemetry)  # same figures, sent again
    assert depth(conn) == 2  # the node says two now: a fresh count, nothing taken off
    assert not conn.released


async def test_a_request_of_ours_the_node_never_reported_takes_nothing_below_zero(
        fleet: Fleet) -> None:
    node = await fleet.node("a", answer, decode_tps=50.0)
    registry, conn = fleet.registry, fleet.registry.get(node.name)
    assert conn is not None
    for _ in range(3):  # short ones, over between two of its reports
        registry.acquire(conn, MODEL)
        registry.release(conn, MODEL)
    assert depth(conn) == 0
    registry.acquire(conn, MODEL)
    assert depth(conn) == 1  # ours, known at once
