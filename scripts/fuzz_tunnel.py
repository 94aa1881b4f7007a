#!/usr/bin/env python3
# ruff: noqa: E402  (the tunnel must be imported under atheris' instrumentation first)
"""Fuzz the tunnel's decoders: whatever bytes arrive, only TunnelError may come out.

Targets (the first input byte picks one):

    frame      frames.decode(raw bytes)
    msgpack    frames.decode of msgpack built from the input (frame-shaped arrays, maps, ...)
    hello      handshake.parse_hello (the decrypted payload of message 1)
    handshake  ResponderHandshake.read_first, raw and as a genuine Noise message
               carrying the fuzzed payload (so the parser behind the DH is reached)
    zstd       compress.decompress with a cap
    session    Session.open of genuine ciphertexts of fuzzed plaintexts (header bits,
               fragments, compression, batches, frames, seq rules), several per session
    connection two sans-I/O Connections (node, coordinator) driven by a fuzzed script of
               operations: open, DATA within and past credit, END/ERROR/CANCEL, reads
               granting credit, WINDOW, GOAWAY, pings, ticks, rekeys, raw frames and raw
               plaintexts from a peer holding the keys; invariants checked after each
               step (no queue past its window, credit never negative)
    token      EnrollmentToken.decode, and the upgrade header's base64
    wsframes   wire.WsConnection reading a stream of websocket frames grown from the input
               (every opcode, fragments, reserved bits, wrong masks, oversize and cut
               lengths, close codes), cut into reads, with its fast frame reader and with
               websockets' parser alone: any difference is a finding (scripts/ws_twin.py)

The targets themselves are in scripts/fuzz_targets.py; this file is the harness.
Any exception that is not a TunnelError subclass is a finding. With atheris (coverage
guided, libFuzzer flags):

    .venv/bin/python scripts/fuzz_tunnel.py -atheris_runs=200000 [corpus_dir]

(-atheris_runs defaults to 100000). Findings are collected, not fatal: each distinct one
(type and place) is printed with its input at the end, and the exit status is 1.
Without atheris, or with --random N, the same harness runs on N random and mutated
inputs (the test suite does this with a few thousand).
"""

from __future__ import annotations

import atexit
import os
import random
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts"):  # the package, and ws_twin beside this script
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

try:
    import atheris  # type: ignore[import-untyped]
except ImportError:  # the random mode needs nothing but the package
    atheris = None

if __name__ == "__main__" and atheris is not None and "--random" not in sys.argv:
    # coverage for the fuzzer: instrument the tunnel package before anything imports it
    with atheris.instrument_imports(include=["tunnel"]):
        import tunnel.compress
        import tunnel.connection
        import tunnel.frames
        import tunnel.handshake
        import tunnel.noise
        import tunnel.session
        import tunnel.token
        import tunnel.ws
        import tunnel.wsframes  # noqa: F401
import zstandard
from fuzz_targets import COORDINATOR, FUNCS, NODE, TARGETS

from tunnel.errors import TunnelError
from tunnel.frames import Frame, FrameType, encode
from tunnel.handshake import InitiatorHandshake
from tunnel.noise import public_bytes
from tunnel.token import EnrollmentToken

runs: Counter[str] = Counter()
findings: dict[tuple[str, str, int], tuple[str, bytes, str]] = {}
#: Under atheris the counts are also printed every this many inputs: a run stopped early
#: by libFuzzer's graceful exit (SIGUSR1) ends without Python's atexit, so without the summary.
PROGRESS_EVERY = 100_000


def one_input(data: bytes) -> None:
    if not data:
        return
    name = TARGETS[data[0] % len(TARGETS)]
    runs[name] += 1
    try:
        FUNCS[name](data[1:])
    except TunnelError:
        pass
    except Exception as exc:  # a finding: anything but the tunnel's own error
        tb = traceback.extract_tb(exc.__traceback__)
        where = tb[-1] if tb else None
        place = (where.filename, where.lineno or 0) if where else ("?", 0)
        key = (type(exc).__name__, *place)
        if key not in findings:
            findings[key] = (name, data, traceback.format_exc())
            # now, too: libFuzzer's -max_total_time exits without running atexit
            print(f"fuzz_tunnel: FINDING in {name}, input {data[:200]!r}\n"
                  f"{findings[key][2]}", file=sys.stderr, flush=True)


# -- seeds, random mode, report --------------------------------------------------------


def seeds() -> list[bytes]:
    """Valid encodings of every kind, so mutations start from deep inside the formats."""
    out = []
    for kind in FrameType:
        sid = 0 if kind not in (FrameType.OPEN, FrameType.DATA, FrameType.END) else 1
        body: Any = {"k": 1}
        if kind == FrameType.DATA:
            body = b"tok"
        elif kind in (FrameType.CANCEL, FrameType.KEY_UPDATE):
            body = None
        elif kind == FrameType.WINDOW:
            body = {"credit": 1}
        elif kind in (FrameType.PING, FrameType.PONG):
            body = {"t": 1}
        if kind == FrameType.CANCEL:
            sid = 1
        packed = encode(Frame(kind, sid, 0, 0, body))
        out.append(bytes([TARGETS.index("frame")]) + packed)
        out.append(bytes([TARGETS.index("session"), 1]) + bytes([len(packed) // 3 * 4]) + packed)
    hello = InitiatorHandshake(NODE, public_bytes(COORDINATOR), now_ms=1).first_message()
    out.append(bytes([TARGETS.index("handshake")]) + hello)
    out.append(bytes([TARGETS.index("zstd")]) + zstandard.ZstdCompressor().compress(b"a" * 300))
    token = EnrollmentToken("ws://127.0.0.1:1/", public_bytes(COORDINATOR), "t", b"s" * 16, 0)
    out.append(bytes([TARGETS.index("token")]) + token.encode().encode())
    # binary, ping, binary (200 bytes), close with a code; cut into reads
    frames = (bytes([0x00, 20]) + b"t" * 20 + bytes([0x09, 3]) + b"pin"
              + bytes([0x01, 200]) + b"u" * 200 + bytes([0x44, 4]) + b"\x03\xe8ok")
    out.append(bytes([TARGETS.index("wsframes"), 0x60]) + frames)
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[pos % len(buf)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 2 and buf:
            del buf[pos : pos + rng.randint(1, 8)]
        elif buf:
            buf[pos % len(buf)] = rng.choice([0, 0xFF, 0x7F, 0x80, 0xC1, 0xDC, 0xDE])
    return bytes(buf)


def run_random(n: int, seed: int = 0) -> dict[str, Any]:
    """Run `n` inputs: a third random bytes, the rest mutated seeds. Returns the report."""
    rng = random.Random(seed)
    pool = seeds()
    for index in range(n):
        if index % 3 == 0:
            target = bytes([index % len(TARGETS)])
            one_input(target + rng.randbytes(rng.randint(0, 300)))
        else:
            one_input(mutate(rng.choice(pool), rng))
    return report()


def report() -> dict[str, Any]:
    return {"runs": dict(runs), "total": sum(runs.values()), "findings": list(findings.values())}


def one_input_with_progress(data: bytes) -> None:
    """`one_input`, and the counts every PROGRESS_EVERY inputs (atheris runs)."""
    one_input(data)
    if data and runs.total() % PROGRESS_EVERY == 0:
        _print_counts()


def _print_counts() -> None:
    print(
        f"\nfuzz_tunnel: {runs.total()} inputs: "
        + ", ".join(f"{name} {count}" for name, count in sorted(runs.items()))
        + f"; {len(findings)} finding(s)",
        file=sys.stderr, flush=True,
    )


def _print_report() -> None:
    _print_counts()
    if not findings:
        print("fuzz_tunnel: no findings (only TunnelError came out)", file=sys.stderr)
        return
    print(f"fuzz_tunnel: {len(findings)} finding(s):", file=sys.stderr)
    for name, data, tb in findings.values():
        print(f"--- target {name}, input {data[:200]!r}\n{tb}", file=sys.stderr)
    os._exit(1)


def main() -> None:
    atexit.register(_print_report)
    if "--random" in sys.argv:
        index = sys.argv.index("--random")
        n = int(sys.argv[index + 1]) if len(sys.argv) > index + 1 else 100_000
        run_random(n)
        return
    if atheris is None:
        print("atheris is not installed: running 100000 random inputs", file=sys.stderr)
        run_random(100_000)
        return
    argv = list(sys.argv)
    if not any(a.startswith("-atheris_runs=") or a.startswith("-runs=") for a in argv):
        argv.append("-atheris_runs=100000")
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if corpus:
        for seed in seeds():
            path = Path(corpus[0]) / f"seed-{seed.hex()[:32]}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(seed)
    atheris.Setup(argv, one_input_with_progress)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
