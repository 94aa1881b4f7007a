"""What one telemetry frame costs the coordinator, on the real tunnel, by stage.

    .venv/bin/python scripts/bench/ingest.py [--nodes 200] [--frames 20] [--procs 2]
                                             [--nice 10] [--rate 1000] [--profile]
                                             [--changing] [--queued] [--gc-policy off,on]

The coordinator side runs in this process: the real tunnel endpoint
(`tunnel.serve`), `Gateway` and `Registry` on a real SQLite store and the GC
policy (`coordinator/gcpolicy.py`), as `meshgate-coordinator serve` wires them
(no HTTP API); `gc_s_by_generation` is the collector's own time. `--procs` simulator
processes (niced) connect `--nodes` enrolled identities and each sends
`--frames` typed telemetry frames shaped like `scripts/bench/fleet_sim.py`'s, at
`--rate` frames/s all together (one frame a websocket message, as real nodes).
Printed: frames received, and this process's CPU (`time.process_time`: the
event loop and the store's worker threads) per frame, in microseconds.

`--changing`: every frame changes what scheduling reads (in flight moves),
so each moves the index; otherwise frames repeat (free memory jitters below a
step), the common case. `--profile`: cProfile of the receiving process, the
top functions by their own time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from coordinator.gateway import Gateway
from coordinator.gcpolicy import gc_loop
from coordinator.registry import Registry
from coordinator.store import Store
from tunnel import FrameType, Identity, Mux, TunnelError, connect
from tunnel import serve as serve_tunnel
from tunnel.noise import public_bytes


def wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


async def sender(spec: dict[str, Any]) -> None:
    import random

    from fleet import SimNode

    rng = random.Random(spec["seed"])
    key = bytes.fromhex(spec["key"])
    nodes = [SimNode(Identity.from_bytes(bytes.fromhex(h)), rng) for h in spec["identities"]]

    gate = asyncio.Semaphore(64)

    async def join(node: SimNode) -> Mux:
        for attempt in range(20):  # a 429 from the handshake limit: back off, try again
            try:
                async with gate:
                    link = await connect(spec["url"], node.identity, key, open_timeout=60)
                break
            except TunnelError:
                await asyncio.sleep(0.5 * random.random() * (attempt + 1))
        else:
            raise TunnelError("could not connect")
        mux = Mux(link, initiator=True)
        tasks.append(asyncio.create_task(mux.run()))
        await mux.send_control(FrameType.INVENTORY, node.inventory())
        return mux

    async def send(node: SimNode, mux: Mux) -> None:
        for i in range(spec["frames"]):
            if spec["changing"]:
                node.in_flight = i % 3
            try:
                await mux.send_control(FrameType.TELEMETRY, node.telemetry())
            except TunnelError:  # its link was closed (an overloaded box): counted as lost
                return
            await asyncio.sleep(spec["period"])  # one frame a message, as a real node's

    tasks: list[asyncio.Task[None]] = []
    muxes = await asyncio.gather(*(join(n) for n in nodes))
    await asyncio.to_thread(Path(spec["ready"]).touch)
    for r in range(spec["rounds"]):
        # every simulator connected: the receiver starts its clock and says go
        await asyncio.to_thread(wait_for_file, Path(f"{spec['go']}{r}"), 300)
        await asyncio.gather(*(send(n, m) for n, m in zip(nodes, muxes, strict=True)))
    await asyncio.sleep(2.0)  # let the last frames leave before closing
    for task in tasks:
        task.cancel()


async def receive(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="meshgate-ingest-"))
    rounds = args.gc_policy.split(",")
    store = Store(f"sqlite:///{root / 'c.db'}")
    now = time.time()
    token_id, secret = store.create_token(3600, {}, now, uses=args.nodes)
    identities = [Identity.generate() for _ in range(args.nodes)]
    for ident in identities:
        store.redeem_token(token_id, secret, ident.did, now)
    registry = Registry()
    gateway = Gateway(store, registry)
    frames = 0
    first: float | None = None
    last = 0.0
    handled = gateway._telemetry  # the gateway's own handler (either path), counted

    def counting(conn: Any, message: Any, body: Any) -> None:
        nonlocal frames, first, last
        handled(conn, message, body)
        frames += 1
        last = time.perf_counter()
        if first is None:
            first = last

    gateway._telemetry = counting  # type: ignore[method-assign]
    if args.queued:  # every frame the queued way (the control task), as before on_control_now
        gateway._control_now = lambda conn, frame: False  # type: ignore[method-assign]
    static = X25519PrivateKey.generate()
    server = await serve_tunnel("127.0.0.1", 0, static, gateway.authorize, gateway.on_link,
                                known=gateway.is_known)
    port = next(iter(server.sockets)).getsockname()[1]
    flusher = asyncio.create_task(gateway.flush_seen_loop())
    per = -(-args.nodes // args.procs)
    procs = []
    for i in range(args.procs):
        spec = root / f"spec{i}.json"
        spec.write_text(json.dumps({
            "url": f"ws://127.0.0.1:{port}", "key": public_bytes(static).hex(), "seed": i,
            "frames": args.frames, "changing": args.changing,
            "ready": str(root / f"ready{i}"), "go": str(root / "go"), "rounds": len(rounds),
            "period": args.nodes / args.rate,
            "identities": [x.to_bytes().hex() for x in identities[i * per:(i + 1) * per]]}))
        procs.append(subprocess.Popen(  # noqa: ASYNC220
            ["nice", "-n", str(args.nice), sys.executable, __file__, "--sender", str(spec)]))
    want = args.nodes * args.frames
    profiler = cProfile.Profile() if args.profile else None
    for i in range(args.procs):
        await asyncio.to_thread(wait_for_file, root / f"ready{i}", 300)
    await asyncio.sleep(1.0)  # the inventories are in
    gc_s = [0.0, 0.0, 0.0]
    gc_n = [0, 0, 0]
    gc_began = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_began[0] = time.perf_counter()
        else:
            gc_s[info["generation"]] += time.perf_counter() - gc_began[0]
            gc_n[info["generation"]] += 1

    gc.callbacks.append(on_gc)
    results = []
    policy: asyncio.Task[None] | None = None
    for r, mode in enumerate(rounds):
        if mode == "on" and policy is None:
            gc.freeze()  # what the server's loop does within FREEZE_EVERY_S
            policy = asyncio.create_task(gc_loop())
        elif mode == "off" and policy is not None:
            policy.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await policy
            policy = None
        gc_s[:], gc_n[:] = [0.0, 0.0, 0.0], [0, 0, 0]
        c0, f0, first, w0 = time.process_time(), frames, None, time.perf_counter()
        (root / f"go{r}").touch()
        if profiler:
            profiler.enable()
        deadline = time.perf_counter() + 300
        while frames < f0 + want and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
            if all(p.poll() is not None for p in procs):
                break
            if frames > f0 and time.perf_counter() - last > 3.0:
                break  # the round's frames stopped coming (links lost on a busy box)
        if profiler:
            profiler.disable()
        cpu, got, wall = time.process_time() - c0, frames - f0, last - w0
        results.append({
            "gc_policy": mode, "frames": got,
            "frames_per_s": round(got / wall, 1) if wall > 0 else None,
            "cpu_s": round(cpu, 3), "us_per_frame": round(cpu / got * 1e6, 1) if got else None,
            "gc_s_by_generation": [round(x, 3) for x in gc_s], "gc_runs": list(gc_n)})
    gc.callbacks.remove(on_gc)
    for p in procs:
        p.wait(60)
    flusher.cancel()
    if policy is not None:
        policy.cancel()
    server.close()
    store.close()
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    out = {"nodes": args.nodes, "frames_per_round": want, "changing": args.changing,
           "queued": args.queued, "gc_objects": len(gc.get_objects()), "rounds": results}
    print(json.dumps(out), flush=True)  # before the teardown of 10,000 links
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="frames per second from all nodes together")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--changing", action="store_true")
    parser.add_argument("--gc-policy", default="on",
                        help="per round, with the server's gc_loop (coordinator/gcpolicy.py) "
                             "or without: on | off | off,on,off,on (interleaved rounds)")
    parser.add_argument("--queued", action="store_true",
                        help="no on_control_now: each frame through the Mux's control task")
    parser.add_argument("--sender", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sender:
        asyncio.run(sender(json.loads(args.sender.read_text())))
        return
    asyncio.run(receive(args))


sys.path.insert(0, str(Path(__file__).resolve().parent))  # fleet.py's SimNode

if __name__ == "__main__":
    main()
