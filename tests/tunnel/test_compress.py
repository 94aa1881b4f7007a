"""zstd per frame: fresh contexts, and the size cap checked before any work."""

from __future__ import annotations

import pytest
import zstandard

from tunnel.compress import Compressor, compress, decompress, frame_length
from tunnel.errors import FrameError


def test_round_trip() -> None:
    data = b"telemetry " * 500
    packed = compress(data)
    assert len(packed) < len(data)
    assert frame_length(packed) == len(packed)
    assert decompress(packed, max_size=len(data)) == data


def test_decompression_bomb_is_refused_before_decompressing() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 * 1024 * 1024))
    assert len(bomb) < 4096
    with pytest.raises(FrameError, match="over the"):
        decompress(bomb, max_size=16 * 1024 * 1024)


def test_frame_without_declared_size_is_refused() -> None:
    writer = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    packed = writer.compress(b"a" * 1000) + writer.flush()
    assert zstandard.frame_content_size(packed) == -1
    with pytest.raises(FrameError, match="declare"):
        decompress(packed, max_size=1 << 20)


def test_no_context_is_shared_between_calls() -> None:
    data = b"secret prompt text " * 40
    assert compress(data) == compress(data)  # same input, same output: nothing carried over
    first = compress(b"a" * 600)
    compress(data)
    assert compress(b"a" * 600) == first


def test_a_reused_compressor_carries_nothing_from_one_frame_to_the_next() -> None:
    secret = b"secret prompt text of another stream " * 40
    probe = b"secret prompt text? " + b"b" * 600
    reused = Compressor()
    reused.compress(secret)
    assert reused.compress(probe) == compress(probe)  # byte for byte a fresh context's
    assert reused.compress(secret) == compress(secret)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p + b"junk",
        lambda p: p[:-5],
        lambda p: p + p,
        lambda p: b"not zstd at all",
        lambda p: b"",
    ],
)
def test_anything_but_exactly_one_whole_frame_is_refused(mutate: object) -> None:
    packed = compress(b"hello world " * 100)
    with pytest.raises(FrameError):
        decompress(mutate(packed), max_size=1 << 20)  # type: ignore[operator]


def test_corrupt_block_is_a_frame_error() -> None:
    packed = bytearray(compress(bytes(range(256)) * 8))
    packed[-8] ^= 0xFF
    with pytest.raises(FrameError):
        decompress(bytes(packed), max_size=1 << 20)


def test_a_small_frame_declaring_64_mib_never_reaches_the_decompressor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 * 1024 * 1024))
    assert len(bomb) < 4096
    assert zstandard.frame_content_size(bomb) == 64 * 1024 * 1024

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("decompressor created for a frame over the cap")

    monkeypatch.setattr(zstandard, "ZstdDecompressor", forbidden)
    with pytest.raises(FrameError, match="declares 67108864 bytes"):
        decompress(bomb, max_size=16 * 1024 * 1024)


def test_a_peer_sending_the_bomb_through_a_session_ends_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tunnel_helpers import join

    from tunnel.constants import HDR_COMPRESSED

    node, coord, _, _ = join()
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 * 1024 * 1024))
    monkeypatch.setattr(zstandard, "ZstdDecompressor", None)  # any use would raise
    message = node._send.encrypt_with_ad(b"", bytes([HDR_COMPRESSED]) + bomb)
    with pytest.raises(FrameError, match="over the"):
        coord.open(message)
    assert coord.dead is not None
