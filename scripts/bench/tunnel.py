"""The tunnel's own cost, measured side by side in one run, as ratios.

    .venv/bin/python scripts/bench/tunnel.py [--chunks 8000] [--rounds 3] [--json OUT.json]

(a) Throughput: token chunks per second from a node to the coordinator through one
    tunnel (Link + Mux: Noise ChaCha20-Poly1305, msgpack frames, credit flow control,
    one loopback websocket) with 1, 16 and 64 concurrent streams, against the same chunks
    sent as plain messages on one loopback websocket by as many tasks ("direct": no
    session, no mux). Rounds interleave direct and tunnel so drift hits both alike; the
    table shows the median of the rounds and tunnel / direct.
(b) Wire efficiency: TCP payload bytes (websocket framing included, counted by a
    FaultProxy in the path) for one typical streamed answer (256 OpenAI
    chat.completion.chunk SSE events) against the SSE bytes themselves, and against
    the direct websocket.
(c) CPU share of crypto (ChaCha20-Poly1305: CipherState.encrypt/decrypt) and of
    compression (zstd: compress.compress/decompress) in a cProfile of a tunnel
    throughput run (16 streams of token chunks), and of a bulk run (64 kB JSON bodies,
    where zstd is used).

Everything runs in this one process on 127.0.0.1; absolute numbers depend on the box,
the ratios are the numbers to compare. Bounded: about half a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from websockets.asyncio.client import connect as ws_connect  # noqa: E402
from websockets.asyncio.server import ServerConnection  # noqa: E402
from websockets.asyncio.server import serve as ws_serve  # noqa: E402

from meshgate.token_frames import ChunkEncoder  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402
from tunnel import Frame, FrameType, Hello, Identity, Link, Mux, Stream, connect, serve  # noqa: E402
from tunnel.noise import public_bytes  # noqa: E402


def sse_chunk(index: int, word: str = " token") -> bytes:
    """One OpenAI chat.completion.chunk as a server-sent event, as llama.cpp sends it."""
    body = {
        "id": "chatcmpl-7f3c2a9e4b1d4e0f9a8b6c5d",
        "object": "chat.completion.chunk",
        "created": 1732400000,
        "model": "SmolLM2-135M-Instruct-Q4_1",
        "system_fingerprint": "b4154-1f922254",
        "choices": [
            {
                "index": 0,
                "delta": {"content": f"{word}{index}"},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def bulk_body(index: int) -> bytes:
    """A 64 kB non-streamed JSON answer (compressible, as real ones are)."""
    words = " ".join(f"word{(index * 31 + i) % 997}" for i in range(9000))
    return json.dumps({"id": f"r{index}", "choices": [{"text": words}]}).encode()[:65536]


# -- the two ways to move chunks --------------------------------------------------------


class Tunnel:
    """A coordinator (serve) and a node (connect) on loopback, a Mux on each side.
    The node answers each OPEN {"n", "kind"} with n DATA chunks and END."""

    def __init__(self, via: FaultProxy | None = None) -> None:
        self.via = via

    async def __aenter__(self) -> Tunnel:
        key = X25519PrivateKey.generate()
        links: asyncio.Queue[Link] = asyncio.Queue()

        async def authorize(hello: Hello, remote: str) -> dict[str, Any]:
            return {}

        async def on_link(link: Link) -> None:
            await links.put(link)
            await link.wait_closed()

        self.server = await serve("127.0.0.1", 0, key, authorize, on_link, ping_interval=None)
        port = next(iter(self.server.sockets)).getsockname()[1]
        if self.via is not None:
            self.via.target_port = port
            port = await self.via.start()
        self.node = await connect(
            f"ws://127.0.0.1:{port}", Identity.generate(), public_bytes(key), ping_interval=None
        )
        self.coord = await links.get()
        self.node_mux = Mux(self.node, initiator=True, on_stream=self._answer)
        self.coord_mux = Mux(self.coord, initiator=False)
        self.tasks = [asyncio.create_task(m.run()) for m in (self.node_mux, self.coord_mux)]
        return self

    async def _answer(self, stream: Stream, frame: Frame) -> None:
        kind = frame.body["kind"]
        if kind == "compact":  # what the node sends: compact token frames of the JSON
            encoder = ChunkEncoder()
            for index in range(frame.body["n"]):
                await stream.send(FrameType.DATA, encoder.encode(sse_chunk(index)[6:-2]))
            await stream.send(FrameType.END, {"n": frame.body["n"]})
            return
        make = bulk_body if kind == "bulk" else sse_chunk
        for index in range(frame.body["n"]):
            await stream.send(FrameType.DATA, make(index))
        await stream.send(FrameType.END, {"n": frame.body["n"]})

    async def fetch(self, n: int, kind: str = "tokens") -> int:
        stream = await self.coord_mux.open({"n": n, "kind": kind})
        got = 0
        async for frame in stream:
            if frame.type == FrameType.DATA:
                got += 1
        return got

    async def __aexit__(self, *exc: object) -> None:
        await self.node.close()
        await self.coord.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.via is not None:
            await self.via.stop()
        self.server.close()
        await self.server.wait_closed()


class Direct:
    """The baseline: a plain websocket (compression off, as the tunnel's), chunks sent
    as messages by concurrent tasks on the client, counted by the server."""

    def __init__(self, via: FaultProxy | None = None) -> None:
        self.via = via
        self.received: asyncio.Queue[int] = asyncio.Queue()

    async def __aenter__(self) -> Direct:
        async def handler(ws: ServerConnection) -> None:
            count = 0
            async for message in ws:
                if message == b"":
                    await self.received.put(count)
                    count = 0
                    continue
                count += 1

        self.server = await ws_serve(handler, "127.0.0.1", 0, compression=None)
        port = next(iter(self.server.sockets)).getsockname()[1]
        if self.via is not None:
            self.via.target_port = port
            port = await self.via.start()
        self.ws = await ws_connect(f"ws://127.0.0.1:{port}", compression=None, ping_interval=None)
        return self

    async def send_all(self, streams: int, per_stream: int) -> int:
        async def one() -> None:
            for index in range(per_stream):
                await self.ws.send(sse_chunk(index))

        await asyncio.gather(*(one() for _ in range(streams)))
        await self.ws.send(b"")  # end marker: the server reports what it counted
        return await self.received.get()

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        if self.via is not None:
            await self.via.stop()
        self.server.close()
        await self.server.wait_closed()


# -- (a) throughput ---------------------------------------------------------------------


async def timed(fn: Callable[[], Awaitable[int]], expect: int) -> float:
    started = time.perf_counter()
    got = await fn()
    elapsed = time.perf_counter() - started
    if got != expect:
        raise RuntimeError(f"moved {got} chunks, expected {expect}")
    return expect / elapsed


async def throughput(chunks: int, rounds: int) -> list[dict[str, Any]]:
    rows = []
    async with Tunnel() as tunnel, Direct() as direct:
        await tunnel.fetch(200)  # warm both paths up
        await direct.send_all(1, 200)
        for streams in (1, 16, 64):
            per = chunks // streams
            total = per * streams
            tun: list[float] = []
            dir_: list[float] = []
            for _ in range(rounds):

                async def via_tunnel(per: int = per, streams: int = streams) -> int:
                    counts = await asyncio.gather(*(tunnel.fetch(per) for _ in range(streams)))
                    return sum(counts)

                async def via_direct(per: int = per, streams: int = streams) -> int:
                    return await direct.send_all(streams, per)

                dir_.append(await timed(via_direct, total))
                tun.append(await timed(via_tunnel, total))
            d, t = statistics.median(dir_), statistics.median(tun)
            rows.append(
                {
                    "streams": streams,
                    "chunks": total,
                    "direct_per_s": d,
                    "tunnel_per_s": t,
                    "ratio": t / d,
                }
            )
    return rows


# -- (b) wire efficiency ----------------------------------------------------------------


async def wire(n: int = 256) -> dict[str, Any]:
    sse = sum(len(sse_chunk(i)) for i in range(n))
    proxy = FaultProxy("127.0.0.1", 0)
    async with Tunnel(via=proxy) as tunnel:
        await tunnel.fetch(1)  # settle: first stream, handshake bytes already counted
        before = dict(proxy.bytes)
        got = await tunnel.fetch(n)
        assert got == n
        await asyncio.sleep(0.05)  # let trailing WINDOW frames through the proxy
        tunnel_down = proxy.bytes["up"] - before["up"]  # node -> coordinator: the answer
        tunnel_back = proxy.bytes["down"] - before["down"]  # OPEN and WINDOW
        before = dict(proxy.bytes)
        assert await tunnel.fetch(n, "compact") == n
        await asyncio.sleep(0.05)
        compact_down = proxy.bytes["up"] - before["up"]
    proxy = FaultProxy("127.0.0.1", 0)
    async with Direct(via=proxy) as direct:
        await direct.send_all(1, 1)
        before = dict(proxy.bytes)
        await direct.send_all(1, n)
        direct_bytes = proxy.bytes["up"] - before["up"] - 6  # minus the end marker frame
    return {
        "chunks": n,
        "sse_bytes": sse,
        "tunnel_answer_bytes": tunnel_down,
        "tunnel_request_and_credit_bytes": tunnel_back,
        "direct_ws_bytes": direct_bytes,
        "tunnel_vs_sse": tunnel_down / sse,
        "tunnel_compact_bytes": compact_down,
        "tunnel_compact_vs_sse": compact_down / sse,
        "direct_vs_sse": direct_bytes / sse,
    }


# -- (c) CPU shares ---------------------------------------------------------------------


def cpu_shares(chunks: int, kind: str, streams: int) -> dict[str, Any]:
    async def run() -> None:
        async with Tunnel() as tunnel:
            per = chunks // streams
            await asyncio.gather(*(tunnel.fetch(per, kind) for _ in range(streams)))

    profile = cProfile.Profile()
    profile.enable()
    asyncio.run(run())
    profile.disable()
    stats = pstats.Stats(profile)
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in table.values())  # tottime of everything

    def cum(module_suffix: str, names: set[str]) -> float:
        return sum(
            float(entry[3])
            for (path, _, name), entry in table.items()
            if path.endswith(module_suffix) and name in names
        )

    crypto = cum("tunnel/noise.py", {"encrypt_with_ad", "decrypt_with_ad"})
    zstd = cum("tunnel/compress.py", {"compress", "decompress"})
    return {
        "run": f"{kind}, {streams} streams, {chunks} chunks",
        "profile_s": total,
        "crypto_share": crypto / total,
        "zstd_share": zstd / total,
    }


# -- report -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=8000, help="chunks per throughput run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    started = time.perf_counter()

    rows = asyncio.run(throughput(args.chunks, args.rounds))
    print("(a) token chunks per second, node -> coordinator, one connection")
    print(f"{'streams':>8} {'chunks':>7} {'direct/s':>10} {'tunnel/s':>10} {'tunnel/direct':>14}")
    for row in rows:
        print(
            f"{row['streams']:>8} {row['chunks']:>7} {row['direct_per_s']:>10.0f} "
            f"{row['tunnel_per_s']:>10.0f} {row['ratio']:>14.2f}"
        )

    w = asyncio.run(wire())
    print(f"\n(b) bytes on the wire for one streamed answer of {w['chunks']} SSE chunks")
    print(f"{'SSE bytes':>26} {w['sse_bytes']:>8}")
    print(
        f"{'tunnel (TCP payload)':>26} {w['tunnel_answer_bytes']:>8}  "
        f"x{w['tunnel_vs_sse']:.3f} of SSE"
    )
    print(f"{'direct websocket':>26} {w['direct_ws_bytes']:>8}  x{w['direct_vs_sse']:.3f} of SSE")
    print(
        f"{'tunnel, compact frames':>26} {w['tunnel_compact_bytes']:>8}  "
        f"x{w['tunnel_compact_vs_sse']:.3f} of SSE"
    )
    print(f"{'tunnel, other way':>26} {w['tunnel_request_and_credit_bytes']:>8}  (OPEN + credit)")

    shares = [
        cpu_shares(args.chunks, "tokens", 16),
        cpu_shares(max(64, args.chunks // 40), "bulk", 4),
    ]
    print("\n(c) share of CPU time (cProfile, both ends in this process)")
    print(f"{'run':>40} {'ChaCha20-Poly1305':>18} {'zstd':>8}")
    for s in shares:
        print(f"{s['run']:>40} {s['crypto_share']:>17.1%} {s['zstd_share']:>8.1%}")
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"throughput": rows, "wire": w, "cpu": shares}, indent=2))


if __name__ == "__main__":
    main()
