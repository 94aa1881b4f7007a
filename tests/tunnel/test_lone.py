"""The fused receive path of a lone control frame (`Session.open_lone`,
`Connection.receive_lone`, `Link._on_message_fused`): what a coordinator gets most,
1 Hz telemetry from every node, read without event objects or a dispatch loop.

It must read exactly what the general path reads and refuse exactly what it refuses:
each case goes to two coordinator sessions on the same keys, one read with
`open_sized`, one with `open_lone` (scripts/fuzz_targets.py does the same on random
input). Then over a real loopback tunnel: telemetry through the fused path keeps its
order with the frames that go the queued way.
"""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import zstandard

from tests.tunnel.mux_pair import mux_pair
from tests.tunnel.tunnel_helpers import join
from tunnel import Frame, FrameType
from tunnel.constants import HDR_BATCH, HDR_COMPRESSED, HDR_MORE
from tunnel.errors import FrameError
from tunnel.noise import CipherState
from tunnel.session import Session

TELEMETRY = int(FrameType.TELEMETRY)


def _twins() -> tuple[Session, Session, Session]:
    """The node's session and two coordinator sessions that read what it sends."""
    node, coord, _, _ = join()
    twin = Session(CipherState(coord._send._key), CipherState(coord._recv._key))
    for side in (coord, twin):
        side.raw_bodies = frozenset({TELEMETRY})
    return node, coord, twin


def _frame(kind: int, stream: int, seq: int, body: object) -> bytes:
    return msgpack.packb([kind, stream, seq, 0, body], use_bin_type=True)


def _both(coord: Session, twin: Session, message: bytes) -> object:
    """What the general path and the fused path make of `message` (they must agree)."""
    try:
        general = coord.open_sized(message)
    except FrameError as exc:
        refused = exc
    else:
        refused = None
    if refused is not None:
        with pytest.raises(FrameError) as caught:
            twin.open_lone(message)
        assert str(caught.value) == str(refused)
        assert twin.dead == coord.dead
        return refused
    lone = twin.open_lone(message)
    assert (lone if isinstance(lone, list) else [lone]) == general
    return lone


def test_a_lone_telemetry_frame_in_order_comes_back_as_one_frame_not_a_list() -> None:
    node, coord, twin = _twins()
    body = {"cpu": 3}
    for seq in range(3):
        (message,) = node.seal(Frame(FrameType.TELEMETRY, 0, 0, 0, body))
        got = _both(coord, twin, message)
        assert isinstance(got, tuple)
        frame, size = got
        assert (frame.type, frame.stream_id, frame.seq) == (FrameType.TELEMETRY, 0, seq)
        assert frame.body == msgpack.packb(body)  # left for the typed decode
        assert size == len(_frame(TELEMETRY, 0, seq, body))


def test_what_the_fused_case_does_not_cover_reads_as_the_general_path_reads_it() -> None:
    node, coord, twin = _twins()
    seal = node._send.encrypt_with_ad
    whole = _frame(TELEMETRY, 0, 0, {"a": 1})
    for plaintext in [
        bytes([HDR_BATCH]) + len(whole).to_bytes(2, "big") + whole,  # batched
        bytes([HDR_COMPRESSED]) + zstandard.ZstdCompressor().compress(
            _frame(TELEMETRY, 0, 1, {"a": 2})),  # compressed
        bytes([0]) + _frame(int(FrameType.INVENTORY), 0, 2, {"a": 3}),  # not a raw type
        bytes([HDR_MORE]) + _frame(TELEMETRY, 0, 3, {"a": 4})[:5],  # a fragment...
        bytes([0]) + _frame(TELEMETRY, 0, 3, {"a": 4})[5:],  # ... and its end
        bytes([0]) + _frame(int(FrameType.PING), 0, 4, {"t": 1}),  # the connection's own
    ]:
        got = _both(coord, twin, seal(b"", plaintext))
        assert isinstance(got, list)
    assert coord.dead is None
    assert twin.dead is None


@pytest.mark.parametrize(
    ("plaintext", "why"),
    [
        (bytes([0]) + _frame(TELEMETRY, 0, 5, {}), "seq 5, expected 0"),
        (bytes([0]) + _frame(TELEMETRY, 3, 0, {}), "not allowed on stream 3"),
        (bytes([0]) + _frame(TELEMETRY, 0, 0, {"x": "y" * 200}), "over its 100-byte cap"),
        (bytes([0]) + bytes([0x95, TELEMETRY, 0, 0, 0, 0xC1]), "not a valid msgpack"),
        (bytes([0]) + bytes([0x95, TELEMETRY]), "not a valid msgpack"),
    ],
)
def test_the_fused_case_refuses_what_the_general_path_refuses(
    plaintext: bytes, why: str
) -> None:
    node, coord, twin = _twins()
    coord.caps[TELEMETRY] = twin.caps[TELEMETRY] = 100
    got = _both(coord, twin, node._send.encrypt_with_ad(b"", plaintext))
    assert isinstance(got, FrameError)
    assert why in str(got)
    with pytest.raises(FrameError, match="session is over"):  # dead, on both paths
        twin.open_lone(node._send.encrypt_with_ad(b"", plaintext))


async def test_telemetry_takes_the_fused_path_and_keeps_its_order_with_queued_frames() -> None:
    order: list[tuple[str, int]] = []
    first = asyncio.Event()
    release = asyncio.Event()
    done = asyncio.Event()

    async def slow(frame: Frame) -> None:  # the queued path: an INVENTORY that waits
        body = frame.body if isinstance(frame.body, dict) else msgpack.unpackb(frame.body)
        if body["n"] == 0:
            await release.wait()
        order.append(("queued", body["n"]))
        if body["n"] == 9:
            done.set()

    def now(frame: Frame) -> bool:
        if frame.type != FrameType.TELEMETRY:
            return False
        assert isinstance(frame.body, bytes)  # raw: the handler decodes it
        n = msgpack.unpackb(frame.body)["n"]
        order.append(("now", n))
        if n == -1:
            first.set()
        if n == 9:
            done.set()
        return True

    pair = await mux_pair(coord_on_control=slow, coord_mux={
        "on_control_now": now, "raw_bodies": (FrameType.TELEMETRY,)})
    try:
        await pair.node_mux.send_control(FrameType.TELEMETRY, {"n": -1})
        await asyncio.wait_for(first.wait(), 5)
        assert order == [("now", -1)]
        ws = pair.coord_link._ws
        assert ws._on_message == pair.coord_link._on_message_fused  # the fused reader
        await pair.node_mux.send_control(FrameType.INVENTORY, {"n": 0})
        for n in range(1, 10):  # while the inventory is being handled: queued behind it
            await pair.node_mux.send_control(FrameType.TELEMETRY, {"n": n})
        async with asyncio.timeout(5):
            while len(pair.coord_mux._control) < 9:  # noqa: ASYNC110 (no event for it)
                await asyncio.sleep(0.01)
        release.set()
        await asyncio.wait_for(done.wait(), 5)
        assert order == [("now", -1), *(("queued", n) for n in range(10))]
        order.clear()
        done.clear()
        for n in range(7, 10):  # the queue is empty again: straight to the handler
            await pair.node_mux.send_control(FrameType.TELEMETRY, {"n": n})
        await asyncio.wait_for(done.wait(), 5)
        assert order == [("now", 7), ("now", 8), ("now", 9)]
    finally:
        await pair.close()
    assert ws._on_message == pair.coord_link._on_message  # the Mux is gone: the usual way
