"""Typed node messages: what a node may say, and what happens when it says something absurd."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import msgpack
import pytest

from coordinator.dispatch import Dispatcher
from coordinator.observed import TIMEOUT_FLOOR_S, Observed, first_token_timeout, requests_ahead
from meshgate.node_messages import (
    MAX_MODELS,
    Inventory,
    LoadDelta,
    ModelInfo,
    ModelLoad,
    Telemetry,
    as_received,
    parse,
    parse_telemetry,
    to_wire,
)
from meshgate.protocol import ProtocolViolation
from tests.coordinator.dispatch_harness import MODEL, Fleet, answer, drain, fleet, request, want
from tunnel import FrameType

__all__ = ["fleet"]  # the fixture, used by name below


def test_a_message_goes_to_the_wire_and_back_unchanged() -> None:
    inv = Inventory(models=[ModelInfo(name="m", loaded=False, n_ctx=2048, memory_bytes=5 << 20,
                                      load_time_s=1.5, capacity=1)])
    wire = to_wire(inv)
    assert wire["v"] == 1
    assert parse(wire, Inventory) == inv
    assert parse(wire, Inventory).entries()["m"].ctx == 2048
    delta = LoadDelta(delta=True, models={"m": ModelLoad(in_flight=3, queued=1)})
    assert parse_telemetry(to_wire(delta)) == delta


def test_older_shapes_still_parse() -> None:
    """Bare names, `queue` for queued, fields a node adds that we do not know."""
    inv = parse({"models": ["a", {"name": "b", "size_bytes": 9, "quantization": "Q4"}]}, Inventory)
    assert inv.entries()["a"].loaded
    assert inv.entries()["b"].size_bytes == 9
    tel = parse_telemetry({"runtime": {"a": {"queue": 2, "pid": 7}}, "host": {"extra": [1]}})
    assert isinstance(tel, Telemetry)
    assert tel.runtime["a"].waiting == 2


ABSURD: list[tuple[dict[str, Any], str]] = [
    ({"gpus": [{"vram_total_bytes": -1}]}, ">= 0"),
    ({"gpus": [{"vram_free_bytes": 1 << 60}]}, "<="),
    ({"runtime": {"m": {"decode_tps": math.nan}}}, ">= 0"),
    ({"runtime": {"m": {"prefill_tps": math.inf}}}, "<="),
    ({"runtime": {"m": {"decode_tps": 1e300}}}, "<="),
    ({"runtime": {"m": {"in_flight": True}}}, "got `bool`"),
    ({"runtime": {"x" * 10_000_000: {}}}, "length <= 256"),
    ({"host": {"cpu_count": "x" * 10_000_000}}, "got `str`"),
    ({"runtime": {f"m{i}": {} for i in range(MAX_MODELS + 1)}}, "length <= 512"),
    ({"v": 2}, "<= 1"),
    ({"gpus": "all of them"}, "Expected `array`"),
]


@pytest.mark.parametrize("as_bytes", [False, True], ids=["map", "msgpack"])
@pytest.mark.parametrize(("body", "why"), ABSURD)
def test_absurd_telemetry_is_a_protocol_violation(
    body: dict[str, Any], why: str, as_bytes: bool
) -> None:
    """The same refusals whether the body came decoded or as its msgpack bytes (how the
    coordinator's tunnel hands telemetry on: `Mux(raw_bodies=...)`)."""
    with pytest.raises(ProtocolViolation, match="bad telemetry") as caught:
        parse_telemetry(msgpack.packb(body) if as_bytes else body)
    assert why in str(caught.value)
    assert len(str(caught.value)) < 300  # the log line stays short whatever was sent


def test_telemetry_as_msgpack_bytes_parses_as_its_map_does() -> None:
    tel = Telemetry(ts=5.0, runtime={"m": ModelLoad(in_flight=2, decode_tps=40.0)})
    delta = LoadDelta(delta=True, models={"m": ModelLoad(queued=1)})
    for message in (tel, delta):
        body = to_wire(message)
        assert parse_telemetry(msgpack.packb(body)) == parse_telemetry(body) == message
    for not_a_map in ([1, 2], 5, "x", None):
        with pytest.raises(ProtocolViolation, match="telemetry must be a map"):
            parse_telemetry(msgpack.packb(not_a_map))
    with pytest.raises(ProtocolViolation, match="bad telemetry"):
        parse_telemetry(b"\x81\xa7runtime" + b"\x91" * 100_000 + b"\xc0")  # nested too deep
    with pytest.raises(ProtocolViolation, match="bad telemetry"):
        parse_telemetry(b"\x81\xa2ts\xc1")  # not msgpack


def test_what_a_node_sent_is_kept_as_its_map_and_decoded_only_when_read() -> None:
    body = {"ts": 5.0, "runtime": {}, "extra": {"anything": [1, 2]}}
    raw = msgpack.packb(body)
    assert as_received(raw) == body
    # an unknown field the typed decode skipped unread, which the tunnel would refuse
    # (an ext type): the telemetry counts, its map shows nothing
    junk = b"\x82\xa2ts\xcb" + msgpack.packb(5.0)[1:] + b"\xa1x\xd4\x05\x01"
    assert parse_telemetry(junk) == Telemetry(ts=5.0)
    assert as_received(junk) == {}


def test_a_huge_inventory_is_refused_before_any_of_it_is_kept() -> None:
    with pytest.raises(ProtocolViolation, match="length <= 512"):
        parse({"models": [f"m{i}" for i in range(1_000_000)]}, Inventory)
    with pytest.raises(ProtocolViolation, match="length <= 256"):
        parse({"models": ["y" * 10_000_000]}, Inventory)
    with pytest.raises(ProtocolViolation, match="must be a map"):
        parse(["models"], Inventory)


BAD_FRAMES: list[tuple[FrameType, dict[str, Any]]] = [
    (FrameType.TELEMETRY, {"gpus": [{"vram_total_bytes": -5}]}),
    (FrameType.TELEMETRY, {"runtime": {MODEL: {"decode_tps": math.nan}}}),
    (FrameType.TELEMETRY, {"delta": True, "models": {MODEL: {"queued": -1}}}),
    (FrameType.INVENTORY, {"models": [f"m{i}" for i in range(100_000)]}),
    (FrameType.INVENTORY, {"models": ["z" * 1_000_000]}),
]


@pytest.mark.parametrize(("kind", "body"), BAD_FRAMES)
async def test_a_node_that_sends_an_absurd_message_loses_its_session_and_nobody_else_notices(
    fleet: Fleet, caplog: pytest.LogCaptureFixture, kind: FrameType, body: dict[str, Any]
) -> None:
    bad = await fleet.node("bad", answer)
    good = await fleet.node("good", answer)
    assert bad.mux is not None
    with caplog.at_level(logging.WARNING, logger="coordinator.gateway"):
        await bad.mux.send_control(kind, body)
        await asyncio.wait_for(bad.link.wait_closed(), 5)
    lines = [r.getMessage() for r in caplog.records if "closing its session" in r.getMessage()]
    assert len(lines) == 1
    assert bad.name in lines[0]
    assert len(lines[0]) < 500
    assert fleet.registry.get(bad.name) is None
    assert {c.did for c in fleet.registry.serving(MODEL)} == {good.name}
    served = await Dispatcher(fleet.registry).start(request(), want())
    await drain(served)
    assert served.node_did == good.name


async def test_load_deltas_move_a_node_in_the_index_without_a_full_report(fleet: Fleet) -> None:
    a = await fleet.node("a", answer, decode_tps=50.0)
    b = await fleet.node("b", answer, decode_tps=50.0)
    first = next(s.did for s in fleet.registry.index.ordered(MODEL))
    busy = a if first == a.name else b
    assert busy.mux is not None
    await busy.mux.send_control(FrameType.TELEMETRY, {"delta": True, "models": {
        MODEL: {"in_flight": 1, "queued": 6}}})
    conn = fleet.registry.get(busy.name)
    assert conn is not None
    for _ in range(100):
        if conn.load.get(MODEL) and conn.load[MODEL].waiting == 6:
            break
        await asyncio.sleep(0.02)
    assert conn.load[MODEL].decode_tps == 50.0  # kept from the full report
    assert [s.did for s in fleet.registry.index.ordered(MODEL)][-1] == busy.name


def test_a_request_waiting_its_turn_gets_a_first_token_timeout_per_request_ahead() -> None:
    seen = Observed()
    seen.first_token(0.5, 100)
    assert requests_ahead(1, None) == 0  # alone on a one-slot node: runs at once
    assert requests_ahead(3, None) == 2  # two of ours before it
    assert requests_ahead(3, 4) == 0  # four slots
    assert requests_ahead(50, 0) == 0  # an upstream we do not cap: never behind anyone
    assert first_token_timeout(60.0, seen, ahead=2) == 3 * TIMEOUT_FLOOR_S
    assert first_token_timeout(8.0, None, ahead=1) == 16.0


def test_the_first_token_timeout_follows_what_was_measured() -> None:
    assert first_token_timeout(60.0, None) == 60.0  # nothing measured: the configured one
    seen = Observed()
    seen.first_token(0.5, 100)
    assert first_token_timeout(60.0, seen) == TIMEOUT_FLOOR_S  # 4 x 0.5 s, floored
    assert first_token_timeout(60.0, seen, load_s=30.0) == 32.0  # a load first
    seen.first_token(40.0, 100)  # a moving average: 0.5 + 0.3 x 39.5
    assert first_token_timeout(60.0, seen) == pytest.approx(4 * 12.35)
    seen.first_token(40.0, 100)
    assert first_token_timeout(30.0, seen) == 30.0  # never past the configured one
    seen.finished(101, 2.0)
    assert seen.decode_tps(1e7) == 50.0  # our measurement beats the claim


async def test_a_repeated_telemetry_moves_nothing_and_a_new_rate_moves_one_slot(
        fleet: Fleet) -> None:
    node = await fleet.node("a", answer, decode_tps=50.0)
    conn = fleet.registry.get(node.name)
    assert conn is not None
    same = parse_telemetry(conn.telemetry)
    assert isinstance(same, Telemetry)
    version = fleet.registry.version
    fleet.registry.set_telemetry(conn, same, conn.telemetry)
    assert fleet.registry.version == version
    body = {**conn.telemetry, "runtime": {MODEL: {"decode_tps": 5.0, "prefill_tps": 50.0}}}
    faster = parse_telemetry(body)
    assert isinstance(faster, Telemetry)
    fleet.registry.set_telemetry(conn, faster, body)
    assert fleet.registry.version == version + 1
    slot = fleet.registry.index.slot(MODEL, node.name)
    assert slot is not None
    assert slot.model.decode_tps == 5.0


async def test_a_report_that_moves_only_the_runners_rss_moves_no_slot(fleet: Fleet) -> None:
    """A real node's report differs every time in what the scheduler does not read (the
    runner's resident memory): kept as the latest load, but no slot moves for it."""
    node = await fleet.node("a", answer, decode_tps=50.0)
    conn = fleet.registry.get(node.name)
    assert conn is not None
    runtime = dict(conn.telemetry["runtime"])
    version = fleet.registry.version
    for rss in (100 << 20, 101 << 20):
        body = {**conn.telemetry, "runtime": {
            name: {**load, "rss_bytes": rss, "load_time_measured": True}
            for name, load in runtime.items()}}
        report = parse_telemetry(body)
        assert isinstance(report, Telemetry)
        fleet.registry.set_telemetry(conn, report, body)
        assert fleet.registry.version == version
        assert conn.load[MODEL].rss_bytes == rss  # the latest, all the same
    body = {**conn.telemetry, "runtime": {MODEL: {**runtime[MODEL], "in_flight": 3}}}
    busier = parse_telemetry(body)
    assert isinstance(busier, Telemetry)
    fleet.registry.set_telemetry(conn, busier, body)
    assert fleet.registry.version == version + 1  # what it reads moved: the slot moves
    slot = fleet.registry.index.slot(MODEL, node.name)
    assert slot is not None
    assert slot.model.queue_depth == 3


def test_a_full_report_decodes_in_one_pass_and_a_delta_still_reads_as_one() -> None:
    """`Telemetry.delta` lets one typed pass read a full report and its kind; a body with
    ``delta: true`` is a LoadDelta, and a bad one is worded as the kind it says it is."""
    full = {"v": 1, "ts": 5.0, "runtime": {MODEL: {"in_flight": 1}}}
    report = parse_telemetry(msgpack.packb(full))
    assert report == Telemetry(ts=5.0, runtime={MODEL: ModelLoad(in_flight=1)})
    assert "delta" not in to_wire(report)  # never on the wire of a full report
    delta = parse_telemetry(msgpack.packb({"delta": True, "models": {MODEL: {"queued": 2}}}))
    assert isinstance(delta, LoadDelta)
    assert delta.models[MODEL].queued == 2
    with pytest.raises(ProtocolViolation, match="bad loaddelta"):
        parse_telemetry(msgpack.packb({"delta": True, "models": {MODEL: {"queued": -1}}}))
    with pytest.raises(ProtocolViolation, match="bad telemetry"):
        parse_telemetry(msgpack.packb({"runtime": {MODEL: {"queued": -1}}}))
