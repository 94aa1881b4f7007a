"""Sizes of the control frames a real node sends (what the tunnel's per-type caps rest on).

    .venv/bin/python scripts/bench/node_frames.py [--model PATH.gguf] [--seconds 20]

Runs a real `meshgate-node run` (real llama.cpp runner on SmolLM2) pinned to a bare
tunnel endpoint in this process (tunnel.serve + Mux, accepting the node), and prints the
largest decoded payload seen per frame type (TELEMETRY, INVENTORY, ...), in bytes.
Bounded by --seconds; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402

from node_agent.state import Enrollment, NodeState  # noqa: E402
from tunnel import Frame, Hello, Link, Mux, serve  # noqa: E402
from tunnel.frames import encode  # noqa: E402
from tunnel.noise import public_bytes  # noqa: E402

MODEL = Path.home() / ".cache" / "meshgate" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


async def measure(model: Path, seconds: float) -> dict[str, int]:
    largest: dict[str, int] = {}
    key = X25519PrivateKey.generate()

    async def authorize(hello: Hello, remote: str) -> dict[str, Any]:
        return {"did": hello.did, "labels": {}}

    async def on_control(frame: Frame) -> None:
        name = frame.type.name
        largest[name] = max(largest.get(name, 0), len(encode(frame)))

    async def on_link(link: Link) -> None:
        await Mux(link, initiator=False, on_control=on_control).run()

    server = await serve("127.0.0.1", 0, key, authorize, on_link, ping_interval=None)
    port = next(iter(server.sockets)).getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        state = NodeState(Path(tmp))
        identity = state.identity()
        state.save_enrollment(Enrollment(url=f"ws://127.0.0.1:{port}",
                                         coordinator_key=public_bytes(key), did=identity.did,
                                         labels={}, enrolled_at=time.time()))
        node = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "node_agent.cli", "run", "--state-dir", tmp,
            "--proxy-port", "0", "--telemetry-period", "0.5", "--model", f"smollm2={model}",
            cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            await asyncio.sleep(seconds)
        finally:
            node.terminate()
            await asyncio.wait_for(node.wait(), 30)
    server.close()
    await server.wait_closed()
    return largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    largest = asyncio.run(measure(args.model, args.seconds))
    if not largest:
        raise SystemExit("the node sent no control frames (did it connect?)")
    for name, size in sorted(largest.items()):
        print(f"{name:10s} {size:8d} bytes")


if __name__ == "__main__":
    main()
