"""Where one telemetry frame's coordinator CPU goes, layer by layer, in memory (no sockets).

    .venv/bin/python scripts/bench/telemetry_path.py [--nodes 1000] [--frames 5] [--rounds 3]

`--nodes` node links, each a real Noise session (real handshake) and a websocket in
OPEN state on a fake transport; every node's telemetry (`scripts/bench/fleet_sim.py`'s
SimNode, fresh each frame) is encrypted by the node's `Connection` and masked by
websockets' client protocol into the exact bytes a socket would deliver. The frames
are then fed to the coordinator's side round-robin over the nodes (as 1 Hz telemetry
arrives), and each stage is timed alone, on fresh sessions (CPU per frame, us):

- `ws_parse`: websockets' `ServerProtocol.receive_data` + `events_received`
- `ws_read`: the fast frame reader `WsConnection` uses once OPEN (`wsframes.read_binary`)
- `core`: `Connection.receive` of the message (decrypt, header, zstd, decode, seq)
- `shell`: `WsConnection.data_received` -> `Link` -> `Mux` with a handler that takes the
  frame and does nothing (the tunnel's whole receive path)
- `full`: the same into the real `Gateway` and `Registry` (`on_control_now` as the
  coordinator wires it: `parse_telemetry`, `set_telemetry`, `heard`)
- `parse`: `parse_telemetry` of the raw body alone; `registry`: `set_telemetry` alone

What the event loop adds (epoll, `_run_once`, the transport's `recv`) is not here:
`fleet.py`'s `telemetry_us_per_frame` minus `full` is that. Medians of `--rounds`.

The collector runs as in the coordinator (`meshgate.serving.gc_threshold`, and what
was built before a stage frozen, as `coordinator.gcpolicy` does every 10 s);
`--gc default`: CPython's own thresholds and no freeze (the figures of session 6).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgpack  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from fleet import SimNode  # noqa: E402
from websockets.client import ClientProtocol  # noqa: E402
from websockets.protocol import State  # noqa: E402
from websockets.server import ServerProtocol  # noqa: E402
from websockets.uri import parse_uri  # noqa: E402

from coordinator.gateway import Gateway  # noqa: E402
from coordinator.registry import NodeConn, Registry  # noqa: E402
from coordinator.store import Store  # noqa: E402
from meshgate.node_messages import parse_telemetry  # noqa: E402
from meshgate.serving import gc_threshold  # noqa: E402
from tunnel import FrameType, Identity, Link, Mux  # noqa: E402
from tunnel.connection import Connection  # noqa: E402
from tunnel.handshake import InitiatorHandshake, ResponderHandshake  # noqa: E402
from tunnel.noise import public_bytes  # noqa: E402
from tunnel.session import Session  # noqa: E402
from tunnel.wire import WsConnection  # noqa: E402
from tunnel.ws import WS_MAX_SIZE  # noqa: E402
from tunnel.wsframes import read_binary  # noqa: E402

COORD_KEY = X25519PrivateKey.generate()


class NullTransport(asyncio.Transport):
    """Takes what the coordinator writes (nothing, on this path) and says it is open."""

    def write(self, data: Any) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


class Node:
    """One simulated node: its sessions' two ends and its frames as socket bytes."""

    def __init__(self, sim: SimNode) -> None:
        self.sim = sim
        initiator = InitiatorHandshake(sim.identity, public_bytes(COORD_KEY),
                                       now_ms=int(time.time() * 1000), info={"host": "sim"})
        responder = ResponderHandshake(COORD_KEY)
        self.hello = responder.read_first(initiator.first_message())
        message2, coord = responder.accept({})
        self.coord: Session = coord
        node_session, _ = initiator.finish(message2)
        self.conn = Connection(node_session, initiator=True)
        self.ws = ClientProtocol(parse_uri("ws://x/"), state=State.OPEN)
        self.messages: list[bytes] = []  # tunnel messages (what websockets delivers)
        self.wire: list[bytes] = []  # the same as socket bytes (masked websocket frames)
        self.bodies: list[bytes] = []  # the telemetry bodies as msgpack

    def make(self, frames: int) -> None:
        self.conn.send_control(FrameType.INVENTORY, self.sim.inventory())
        for i in range(frames + 1):
            if i:
                body = self.sim.telemetry()
                self.bodies.append(msgpack.packb(body))
                self.conn.send_control(FrameType.TELEMETRY, body)
            for message in self.conn.data_to_send(0.0):  # one message a frame (1 Hz)
                self.messages.append(message)
                self.ws.send_binary(message)
                self.wire.append(b"".join(self.ws.data_to_send()))


def build(count: int, frames: int, seed: int) -> list[Node]:
    rng = random.Random(seed)
    nodes = [Node(SimNode(Identity.generate(), rng)) for _ in range(count)]
    for node in nodes:
        node.make(frames)
    return nodes


def order(nodes: list[Node], frames: int) -> list[tuple[int, int]]:
    """(node, message) pairs: the inventory of each, then frame by frame round-robin."""
    out = [(n, 0) for n in range(len(nodes))]
    out += [(n, f) for f in range(1, frames + 1) for n in range(len(nodes))]
    return out


FREEZE = [True]  # --gc coordinator: freeze what was built before timing a stage


def timed(pairs: list[tuple[int, int]], step: Callable[[int, int], None], skip: int) -> float:
    """CPU us per frame of `step` over the pairs after the first `skip` (the inventories)."""
    for n, m in pairs[:skip]:
        step(n, m)
    if FREEZE[0]:
        gc.freeze()  # what was built so far: the server's heap, frozen every 10 s
    began = time.process_time()
    for n, m in pairs[skip:]:
        step(n, m)
    return (time.process_time() - began) / (len(pairs) - skip) * 1e6


async def one_round(count: int, frames: int, seed: int, state: Path) -> dict[str, float]:
    pairs = order([None] * count, frames)  # type: ignore[list-item]
    out: dict[str, float] = {}

    nodes = build(count, frames, seed)
    servers = [ServerProtocol(max_size=WS_MAX_SIZE, state=State.OPEN) for _ in nodes]

    def ws_parse(n: int, m: int) -> None:
        servers[n].receive_data(nodes[n].wire[m])
        servers[n].events_received()

    out["ws_parse"] = timed(pairs, ws_parse, count)

    def ws_read(n: int, m: int) -> None:
        read_binary(nodes[n].wire[m], True, WS_MAX_SIZE)

    out["ws_read"] = timed(pairs, ws_read, count)

    nodes = build(count, frames, seed)
    coords = [Connection(node.coord, initiator=False) for node in nodes]

    def core(n: int, m: int) -> None:
        coords[n].receive(nodes[n].messages[m], 0.0)

    out["core"] = timed(pairs, core, count)

    for stage in ("shell", "full"):
        nodes = build(count, frames, seed)
        store = Store(f"sqlite:///{state / f'{stage}.db'}")
        registry = Registry()
        gateway = Gateway(store, registry)
        wss: list[WsConnection] = []
        for node in nodes:
            ws = WsConnection(ServerProtocol(max_size=WS_MAX_SIZE, state=State.OPEN))
            ws.connection_made(NullTransport())
            link = Link(ws, node.coord, initiator=False, hello=node.hello, ping_interval=None)
            if stage == "shell":
                mux = Mux(link, initiator=False, on_control_now=lambda frame: True,
                          raw_bodies=(FrameType.TELEMETRY,))
            else:
                holder: list[NodeConn] = []
                mux = Mux(link, initiator=False,
                          on_control_now=lambda frame, h=holder, g=gateway:
                          g._control_now(h[0], frame),
                          raw_bodies=(FrameType.TELEMETRY,))
            conn = NodeConn(did=node.hello.did, labels={}, link=link, mux=mux)
            if stage == "full":
                holder.append(conn)
            registry.add(conn)
            link._on_events = mux._dispatch  # what `Mux.run` does
            if hasattr(link, "hand_control_to"):  # (a tree from before the fused path)
                link.hand_control_to(mux._on_control_frame)
            wss.append(ws)

        def shell(n: int, m: int, wss: list[WsConnection] = wss,
                  nodes: list[Node] = nodes) -> None:
            wss[n].data_received(nodes[n].wire[m])

        for n, m in pairs[:count]:  # the inventories, through the core
            shell(n, m)
        for node in nodes:  # ... and into the registry, as the control task does
            conn_ = registry.get(node.hello.did)
            assert conn_ is not None
            queued = conn_.mux._control
            while queued:
                frame, _ = queued.popleft()
                await gateway._message(conn_, frame)
            conn_.mux._control_bytes = 0
        out[stage] = timed(pairs[count:], shell, 0)
        if stage == "full":
            telemetry = [parse_telemetry(body) for node in nodes for body in node.bodies]
            began = time.process_time()
            for node in nodes:
                for body in node.bodies:
                    parse_telemetry(body)
            out["parse"] = (time.process_time() - began) / len(telemetry) * 1e6
            conns = [registry.get(node.hello.did) for node in nodes]
            began = time.process_time()
            for f in range(frames):
                for n, node in enumerate(nodes):
                    registry.set_telemetry(conns[n], telemetry[n * frames + f],  # type: ignore[arg-type]
                                           node.bodies[f])
            out["registry"] = (time.process_time() - began) / len(telemetry) * 1e6
        store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gc", choices=("coordinator", "default"), default="coordinator")
    args = parser.parse_args()
    threshold = gc_threshold() if args.gc == "coordinator" else None
    FREEZE[0] = threshold is not None
    if threshold is not None:
        gc.set_threshold(*threshold)
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="meshgate-path-") as tmp:
        for r in range(args.rounds):
            got = asyncio.run(one_round(args.nodes, args.frames, args.seed + r, Path(tmp)))
            for key, value in got.items():
                rows.setdefault(key, []).append(value)
            gc.unfreeze()
            gc.collect()
    out: dict[str, Any] = {k: round(statistics.median(v), 1) for k, v in rows.items()}
    out["rounds"] = {k: [round(x, 1) for x in v] for k, v in rows.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
