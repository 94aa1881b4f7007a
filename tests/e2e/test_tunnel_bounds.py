"""A memory bomb from an enrolled node (issue 9, item 1), against a real coordinator process.

The malicious node is the real tunnel library (`tunnel.connect`, its own Noise session)
writing hand-made frames straight onto its websocket. An honest real node serves `fake`
from a FAKE OpenAI upstream (tests/node/fake_openai_server.py: no model, canned answers,
the real wire format); a keyed chat request through it is the "normal request".

Bounds asserted (tunnel/constants.py, tunnel/DESIGN.md "Bounds"): the coordinator's RSS
grows by less than the stated limit, the link is closed with one log line saying why,
and the normal request is answered meanwhile.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import pytest

from node_agent.state import NodeState
from tests.e2e.mesh import Mesh, Proc, free_port, mesh_at, wait_until
from tunnel import Frame, FrameType, Link, connect
from tunnel.connection import StreamState
from tunnel.constants import FRAME_CAPS, HDR_COMPRESSED, INITIAL_STREAM_WINDOW, MAX_FRAME, MiB
from tunnel.session import SEND

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "node" / "fake_openai_server.py"
BURST = 200


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    for mesh in mesh_at(tmp_path_factory.mktemp("bounds")):
        port = free_port()
        log = mesh.root / "upstream.log"
        upstream = Proc(
            subprocess.Popen(
                [sys.executable, str(FAKE), "--port", str(port), "--name", "fake"],
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
            ),
            log,
        )
        try:
            mesh.start_coordinator()
            mesh.key = mesh.make_key("bounds")
            for name in ("honest", "evil-a", "evil-b"):
                enrolled = mesh.enroll(name)
                assert enrolled.returncode == 0, enrolled.stderr
            mesh.start_node("honest", extra=("--upstream", f"fake=http://127.0.0.1:{port}/v1"))
            mesh.wait_serving("fake")
            yield mesh
        finally:
            upstream.stop()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class PeakRss:
    """The highest RSS of a process while the block runs (sampled every 10 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = self.before = rss_mib(pid)

    async def __aenter__(self) -> PeakRss:
        self._task = asyncio.create_task(self._sample())
        return self

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, await asyncio.to_thread(rss_mib, self.pid))
            await asyncio.sleep(0.01)

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        self.peak = max(self.peak, rss_mib(self.pid))

    @property
    def growth(self) -> float:
        return self.peak - self.before


async def normal_request(mesh: Mesh) -> float:
    """A keyed chat request through the honest node: its latency in seconds."""
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as client:
        reply = await client.post(
            f"{mesh.api}/chat/completions",
            headers={"Authorization": f"Bearer {mesh.key}"},
            json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]
    return time.monotonic() - started


async def evil_link(mesh: Mesh, name: str) -> Link:
    state = NodeState(mesh.root / name)
    enrollment = state.enrollment()
    assert enrollment is not None
    return await connect(
        enrollment.url, state.identity(), enrollment.coordinator_key, ping_interval=None
    )


def zstd_frame(kind: FrameType, stream_id: int, seq: int, body: dict[str, object],
               zeros: int) -> bytes:
    """A chunk whose zstd payload decodes to the frame [kind, stream_id, seq, 0, body]
    with `zeros` zero bytes in body["pad"] (last): built by hand as an attacker would, a
    raw block for the msgpack head then RLE blocks (RFC 8878), so it costs nothing here."""
    empty = msgpack.packb([int(kind), stream_id, seq, 0, {**body, "pad": b""}])
    assert empty.endswith(b"\xc4\x00")  # bin 8 of length 0, last: make it bin 32 of `zeros`
    head = empty[:-2] + b"\xc6" + zeros.to_bytes(4, "big")
    out = bytearray(b"\x28\xb5\x2f\xfd\xe0")  # magic; single segment, 8-byte content size
    out += (len(head) + zeros).to_bytes(8, "little")
    out += (len(head) << 3).to_bytes(3, "little") + head  # raw block
    left = zeros
    while left:
        n = min(left, 128 * 1024)
        left -= n
        out += ((n << 3) | (1 << 1) | (0 if left else 1)).to_bytes(3, "little") + b"\0"
    if not zeros:
        raise ValueError("zeros must be > 0")
    return bytes([HDR_COMPRESSED]) + bytes(out)


async def blast(link: Link, plaintexts: list[bytes]) -> None:
    """Encrypt under the link's own session and write back to back, past the core."""
    cipher = link.conn.session._send
    for plaintext in plaintexts:
        await link._ws.send(cipher.encrypt_with_ad(b"", plaintext))


def closed_lines(mesh: Mesh) -> list[str]:
    assert mesh.coordinator is not None
    text = mesh.coordinator.log_text()
    return [line for line in text.splitlines() if "tunnel link closed" in line]


async def test_frames_declaring_16_mib_are_refused_at_the_first_and_cost_nothing(
    mesh: Mesh,
) -> None:
    coordinator = mesh.coordinator
    assert coordinator is not None
    await normal_request(mesh)  # warm
    link = await evil_link(mesh, "evil-a")
    big = MAX_FRAME - 64  # each declares (and decompresses to) ~16 MiB
    kinds = [FrameType.TELEMETRY, FrameType.INVENTORY]
    burst = [zstd_frame(kinds[i % 2], 0, 1 + i, {}, big) for i in range(BURST // 2)]
    burst += [zstd_frame(FrameType.OPEN, 1 + 2 * i, 0, {}, big) for i in range(BURST // 2)]
    wire = sum(len(p) for p in burst)
    async with PeakRss(coordinator.popen.pid) as rss:
        await blast(link, burst)
        latency = await normal_request(mesh)
        await asyncio.to_thread(wait_until, lambda: closed_lines(mesh), 10, "the link closed")
    print(f"\n{BURST} frames, {wire / 1024:.0f} kB on the wire, each declaring 16 MiB: "
          f"coordinator RSS +{rss.growth:.1f} MiB (from {rss.before:.0f}), "
          f"normal request {latency * 1000:.0f} ms")
    assert rss.growth < 32  # the first frame is refused before a byte is decompressed
    assert latency < 5
    link.abort("test over")
    lines = closed_lines(mesh)
    assert len(lines) == 1, lines  # one line for the link, not one per frame
    assert f"over its {FRAME_CAPS[FrameType.TELEMETRY]}-byte cap" in lines[0]
    await normal_request(mesh)


async def test_open_frames_just_under_their_cap_are_decoded_one_message_at_a_time(
    mesh: Mesh,
) -> None:
    """200 OPENs of ~8 MiB each (just under the OPEN cap), back to back: the reader
    decodes one message, lets the handlers run, then the next, so each request is
    answered and dropped before the next is decoded; the coordinator never holds the
    burst (the 64 MiB-per-link OPEN budget is the backstop, tested in memory)."""
    coordinator = mesh.coordinator
    assert coordinator is not None
    link = await evil_link(mesh, "evil-b")
    pad = FRAME_CAPS[FrameType.OPEN] - 4096
    body: dict[str, object] = {"request_id": "bomb", "endpoint": "chat", "model": "fake",
                               "stream": True, "body": {"model": "fake", "messages": []}}
    ids = [1 + 2 * i for i in range(BURST)]
    burst = [zstd_frame(FrameType.OPEN, sid, 0, body, pad) for sid in ids]
    for sid in ids:  # our side of the streams, so that the answers are taken
        opened = Frame(FrameType.OPEN, sid, 0, 0, {})
        link.conn.session._streams.advance(opened, SEND)
        link.conn.streams[sid] = StreamState(sid, INITIAL_STREAM_WINDOW)
    answered: set[int] = set()

    async def answers() -> None:
        while len(answered) < BURST:
            frame = await link.recv()
            if frame.type in (FrameType.END, FrameType.ERROR):
                answered.add(frame.stream_id)

    async with PeakRss(coordinator.popen.pid) as rss:
        reader = asyncio.create_task(answers())
        await blast(link, burst)
        latency = await normal_request(mesh)
        await asyncio.wait_for(reader, 60)
    print(f"\n{BURST} OPEN frames of {pad / MiB:.1f} MiB each, back to back: coordinator RSS "
          f"+{rss.growth:.1f} MiB (from {rss.before:.0f}), all answered; normal request "
          f"{latency * 1000:.0f} ms")
    assert answered == set(ids)
    assert rss.growth < 128  # a few requests' worth at once, never the burst (1.6 GB)
    assert latency < 5
    await link.close()
    await normal_request(mesh)
