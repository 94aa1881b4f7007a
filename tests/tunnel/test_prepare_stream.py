"""`Session.prepare_stream`, the request path's OPEN and END without a Frame restamped:
the same bytes, seqs and refusals as `prepare`, on twin sessions."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tunnel.errors import TunnelError
from tunnel.frames import Frame, FrameType
from tunnel.noise import CipherState
from tunnel.session import Prepared, Session


def twins() -> tuple[Session, Session]:
    key, other = os.urandom(32), os.urandom(32)
    return (Session(CipherState(key), CipherState(other)),
            Session(CipherState(key), CipherState(other)))


def both(fast: Session, slow: Session, kind: FrameType, sid: int, flags: int,
         body: Any) -> tuple[Prepared | str, Prepared | str]:
    got: list[Prepared | str] = []
    for call in (lambda: fast.prepare_stream(kind, sid, flags, body),
                 lambda: slow.prepare(Frame(kind, sid, 0, flags, body))):
        try:
            got.append(call())
        except TunnelError as exc:
            got.append(f"{type(exc).__name__}: {exc}")
    return got[0], got[1]


def test_open_data_and_end_come_out_the_same_and_seqs_move_the_same() -> None:
    fast, slow = twins()
    steps: list[tuple[FrameType, int, int, Any]] = [
        (FrameType.OPEN, 2, 1, {"model": "m", "body": {"x": "y" * 700}}),  # compressed
        (FrameType.OPEN, 4, 0, {}),
        (FrameType.END, 2, 0, {"usage": {"n": 1}}),
        (FrameType.ERROR, 4, 0, {"status": 500, "message": "no"}),
    ]
    prepared: list[tuple[Prepared, Prepared]] = []
    for step in steps:
        fast_got, slow_got = both(fast, slow, *step)
        assert fast_got == slow_got
        assert isinstance(fast_got, tuple)
        assert isinstance(slow_got, tuple)
        prepared.append((fast_got, slow_got))
    assert prepared[0][0][1]  # the large OPEN went compressed
    assert fast._streams.next == slow._streams.next
    assert fast._streams.ended == slow._streams.ended
    assert fast.encrypt([p[0] for p in prepared]) == slow.encrypt([p[1] for p in prepared])


@pytest.mark.parametrize("step", [
    (FrameType.OPEN, 2, 0, {"again": 1}),  # an id in use
    (FrameType.END, 6, 0, {}),  # never opened
    (FrameType.END, 2, 0, {"late": 1}),  # after it ended: checked below
    (FrameType.END, 0, 0, {}),  # the control stream
    (FrameType.OPEN, 8, 0, {1: "int key"}),  # not a map with str keys
    (FrameType.OPEN, 10, 0, {"x": object()}),  # cannot be encoded
    (FrameType.END, 12, 0, {"blob": "x" * (70 * 1024)}),  # over END's cap
    (FrameType.OPEN, 1 << 31, 0, {}),  # an id out of range
])
def test_what_prepare_refuses_prepare_stream_refuses_in_the_same_words(
    step: tuple[FrameType, int, int, Any],
) -> None:
    fast, slow = twins()
    for session in (fast, slow):
        session.prepare(Frame(FrameType.OPEN, 2, 0, 0, {}))
        session.prepare(Frame(FrameType.OPEN, 12, 0, 0, {}))
        if step[2] == 0 and step[3] == {"late": 1}:
            session.prepare(Frame(FrameType.END, 2, 0, 0, {}))
    fast_got, slow_got = both(fast, slow, *step)
    assert isinstance(fast_got, str)
    assert fast_got == slow_got
    assert fast._streams.next == slow._streams.next
