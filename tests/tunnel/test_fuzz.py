"""Property tests: whatever bytes arrive, only TunnelError subclasses come out."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tunnel_helpers import join

from tunnel.compress import decompress
from tunnel.constants import PROLOGUE
from tunnel.errors import FrameError, HandshakeError, TunnelError
from tunnel.frames import decode
from tunnel.handshake import ResponderHandshake
from tunnel.identity import did_to_ed25519
from tunnel.noise import HandshakeState, public_bytes

COORDINATOR = X25519PrivateKey.generate()
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.text(max_size=5) | st.integers(-1000, 1000), inner, max_size=6)
    ),
    max_leaves=20,
)


@FAST
@given(st.binary(max_size=300))
def test_decode_of_any_bytes_only_raises_frame_error(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        decode(data)


@FAST
@given(msgpack_values)
def test_decode_of_any_msgpack_value_only_raises_frame_error(value: object) -> None:
    with contextlib.suppress(FrameError):
        decode(msgpack.packb(value))


@FAST
@given(st.integers(0, 20), st.integers(-1, 2**32), st.integers(-1, 2**32), msgpack_values)
def test_decode_of_frame_shaped_arrays_only_raises_frame_error(
    kind: int, sid: int, seq: int, body: object
) -> None:
    with contextlib.suppress(FrameError):
        decode(msgpack.packb([kind, sid, seq, 0, body]))


@FAST
@given(st.binary(max_size=400))
def test_session_open_of_any_bytes_only_raises_frame_error(data: bytes) -> None:
    _, coord, _, _ = join(coordinator=COORDINATOR)
    with contextlib.suppress(FrameError):
        coord.open(data)


@FAST
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_session_open_of_authentic_garbage_only_raises_frame_error(chunks: list[bytes]) -> None:
    """A peer holding the keys sends arbitrary plaintexts."""
    node, coord, _, _ = join(coordinator=COORDINATOR)
    for chunk in chunks:
        try:
            coord.open(node._send.encrypt_with_ad(b"", chunk))
        except FrameError:
            return


@FAST
@given(st.binary(max_size=400))
def test_read_first_of_any_bytes_only_raises_handshake_error(data: bytes) -> None:
    with contextlib.suppress(HandshakeError):
        ResponderHandshake(COORDINATOR).read_first(data)


@FAST
@given(msgpack_values | st.binary(max_size=200))
def test_read_first_of_authentic_garbage_only_raises_handshake_error(payload: object) -> None:
    raw = payload if isinstance(payload, bytes) else msgpack.packb(payload)
    sender = HandshakeState(
        True, PROLOGUE, X25519PrivateKey.generate(), rs=public_bytes(COORDINATOR)
    )
    with contextlib.suppress(HandshakeError):
        ResponderHandshake(COORDINATOR).read_first(sender.write_message(raw))


@FAST
@given(st.binary(max_size=300))
def test_decompress_of_any_bytes_only_raises_frame_error(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        decompress(data, max_size=1 << 16)


@FAST
@given(st.text(max_size=80))
def test_did_parsing_only_raises_tunnel_error(text: str) -> None:
    with contextlib.suppress(TunnelError):
        did_to_ed25519("did:key:z" + text)


def _fuzz_harness() -> Any:
    """scripts/fuzz_tunnel.py, the atheris harness, loaded as a module (no atheris needed)."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_tunnel.py"
    spec = importlib.util.spec_from_file_location("fuzz_tunnel", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fuzz_harness_finds_nothing_in_a_short_random_run() -> None:
    """2,000 random and mutated inputs over every target of scripts/fuzz_tunnel.py."""
    harness = _fuzz_harness()
    result = harness.run_random(2000, seed=1)
    assert result["findings"] == [], result["findings"][0][2]
    assert result["total"] >= 1900
    assert set(result["runs"]) == set(harness.TARGETS)  # every target was reached


def test_the_fuzz_harness_reports_what_is_not_a_tunnel_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    harness = _fuzz_harness()

    def broken(data: bytes) -> None:
        raise KeyError("a bug")

    monkeypatch.setitem(harness.FUNCS, "frame", broken)  # FUNCS is fuzz_targets', shared
    harness.one_input(bytes([harness.TARGETS.index("frame")]) + b"x")
    [(target, data, tb)] = harness.report()["findings"]
    assert (target, data) == ("frame", b"\x00x")
    assert "KeyError" in tb


def test_an_atheris_run_prints_its_counts_as_it_goes(capsys: pytest.CaptureFixture[str]) -> None:
    """libFuzzer ends a run without Python's atexit: the counts are printed on the way."""
    harness = _fuzz_harness()
    harness.PROGRESS_EVERY = 3
    frame = bytes([harness.TARGETS.index("frame")]) + b"x"
    for _ in range(7):
        harness.one_input_with_progress(frame)
    harness.one_input_with_progress(b"")  # an empty input counts as nothing
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fuzz_")]
    assert lines == ["fuzz_tunnel: 3 inputs: frame 3; 0 finding(s)",
                     "fuzz_tunnel: 6 inputs: frame 6; 0 finding(s)"]
