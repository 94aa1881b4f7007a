"""What one frame costs the tunnel, in CPU microseconds: the core alone, and through a link.

    .venv/bin/python scripts/bench/frames.py [--frames 20000] [--rounds 3] [--json OUT]

(a) core: the coordinator's `Connection.receive` of one message carrying one TELEMETRY
    frame shaped like a real node's (`scripts/bench/fleet_sim.py`'s SimNode: some frames
    over 512 bytes, so zstd-compressed), in memory: decrypt, header, decompress, decode,
    sequence check, events.
(b) link: the same frames from a node to a coordinator over one real loopback tunnel
    (`tunnel.connect` / `tunnel.serve`, a `Mux` on each end, the coordinator's frames
    handled in the reader as the gateway does with `on_control_now`), each frame its own
    websocket message (the node flushes after each, as 1 Hz telemetry leaves); CPU of
    this process (both ends) per frame.
(c) stream: token DATA frames on 16 streams, coordinator -> node, CPU per frame (both
    ends), frames coalesced as they queue (the 500-stream path).

Absolute figures depend on the box; to compare two versions of `tunnel/`, run this file
from each tree in turn (rounds interleaved by the caller) and compare the ratios.
Loopback only, bounded (a few seconds a round).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from fleet import SimNode  # noqa: E402

from tunnel import Frame, FrameType, Hello, Identity, Link, Mux, Stream, connect, serve  # noqa: E402
from tunnel.connection import Connection  # noqa: E402
from tunnel.handshake import InitiatorHandshake, ResponderHandshake  # noqa: E402
from tunnel.noise import public_bytes  # noqa: E402


def telemetry_bodies(count: int) -> list[dict[str, Any]]:
    rng = random.Random(7)
    nodes = [SimNode(Identity.generate(), rng) for _ in range(32)]
    return [nodes[i % len(nodes)].telemetry() for i in range(count)]


def core(bodies: list[dict[str, Any]]) -> float:
    key = X25519PrivateKey.generate()
    initiator = InitiatorHandshake(Identity.generate(), public_bytes(key), now_ms=1)
    responder = ResponderHandshake(key)
    responder.read_first(initiator.first_message())
    message2, coord_session = responder.accept({})
    node_session, _ = initiator.finish(message2)
    node = Connection(node_session, initiator=True)
    coord = Connection(coord_session, initiator=False)
    messages = []
    for body in bodies:
        node.send_control(FrameType.TELEMETRY, body)
        messages.extend(node.data_to_send(0.0))
    began = time.process_time()
    for message in messages:
        coord.receive(message, 0.0)
    return (time.process_time() - began) / len(messages) * 1e6


async def _pair(
    on_control_now: Any, on_stream: Any = None
) -> tuple[Any, Link, Mux, Mux, list[Any]]:
    key = X25519PrivateKey.generate()
    links: asyncio.Queue[Link] = asyncio.Queue()

    async def authorize(hello: Hello, remote: str) -> dict[str, Any]:
        return {}

    async def on_link(link: Link) -> None:
        await links.put(link)
        await link.wait_closed()

    server = await serve("127.0.0.1", 0, key, authorize, on_link, ping_interval=None)
    port = next(iter(server.sockets)).getsockname()[1]
    node_link = await connect(f"ws://127.0.0.1:{port}", Identity.generate(), public_bytes(key),
                              ping_interval=None)
    coord_link = await links.get()
    node_mux = Mux(node_link, initiator=True, on_stream=on_stream)
    coord_mux = Mux(coord_link, initiator=False, on_control_now=on_control_now)
    tasks = [asyncio.create_task(node_mux.run()), asyncio.create_task(coord_mux.run())]
    return server, node_link, node_mux, coord_mux, tasks


async def _close(server: Any, node_link: Link, tasks: list[Any]) -> None:
    await node_link.close()
    await asyncio.wait(tasks, timeout=5)
    server.close()
    await server.wait_closed()


async def link(bodies: list[dict[str, Any]]) -> float:
    got = 0
    done = asyncio.Event()

    def on_control_now(frame: Frame) -> bool:
        nonlocal got
        got += 1
        if got == len(bodies):
            done.set()
        return True

    server, node_link, node_mux, _, tasks = await _pair(on_control_now)
    began = time.process_time()
    for body in bodies:
        await node_mux.send_control(FrameType.TELEMETRY, body)
        await node_link.flush()  # each frame its own message, as 1 Hz telemetry leaves
        await asyncio.sleep(0)
    await asyncio.wait_for(done.wait(), 60)
    cpu = time.process_time() - began
    await _close(server, node_link, tasks)
    return cpu / len(bodies) * 1e6


async def stream(count: int, streams: int = 16) -> float:
    chunk = b'{"c":[{"d":{"content":" token"}}]}' * 2

    async def answer(stream: Stream, frame: Frame) -> None:
        for _ in range(count // streams):
            await stream.send(FrameType.DATA, chunk)
        await stream.send(FrameType.END, {})

    server, node_link, _, coord_mux, tasks = await _pair(None, on_stream=answer)

    async def read(s: Stream) -> int:
        n = 0
        async for frame in s:
            n += frame.type == FrameType.DATA
        return n

    began = time.process_time()
    opened = [await coord_mux.open({}) for _ in range(streams)]
    total = sum(await asyncio.gather(*(read(s) for s in opened)))
    cpu = time.process_time() - began
    await _close(server, node_link, tasks)
    return cpu / total * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bodies = telemetry_bodies(args.frames)
    rows: dict[str, list[float]] = {"core_us": [], "link_us": [], "stream_us": []}
    for _ in range(args.rounds):
        rows["core_us"].append(core(bodies))
        rows["link_us"].append(asyncio.run(link(bodies[: args.frames // 4])))
        rows["stream_us"].append(asyncio.run(stream(args.frames)))
    out = {name: round(statistics.median(values), 2) for name, values in rows.items()}
    out["rounds"] = {name: [round(v, 2) for v in values] for name, values in rows.items()}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
