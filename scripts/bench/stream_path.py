"""Python calls per token frame on the stream path, node encode to the coordinator's write.

    .venv/bin/python scripts/bench/stream_path.py [--streams 200] [--chunks 64]
        [--against DIR] [--top 25]

One process, one loop (uvloop), a real loopback tunnel (tests/tunnel/mux_pair.py): the
node's side answers each stream with ``--chunks`` token chunks, one a frame
(``ChunkEncoder.encode_batch`` of one chunk, then ``Stream.send``, then one loop turn, as
one read of a runner at model pace brings one token); the coordinator's side reads each
stream with the real ``NodeAttempt`` and ``EventStream`` (coordinator/served.py,
answer_stream.py) into an ASGI ``send`` that only counts. cProfile counts every Python
call (functions and builtins) over ``--streams`` streams, and the figure is calls per
frame, by where they are (tunnel module, coordinator, meshgate, stdlib, builtins): a
count, the same from run to run, where CPU times on a shared box are not. It leaves out
the sockets' and uvicorn's work (the client write) and the HTTP side.

``--against DIR`` runs the same in another checkout's code (a subprocess with DIR first
on ``sys.path``) and prints both.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import json
import os
import pstats
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("STREAM_PATH_ROOT", Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(ROOT))


def token_chunk(i: int) -> bytes:
    return json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}],
    }, separators=(",", ":")).encode()


class _Node:
    did = "did:key:stream-path"
    served = 0

    def __init__(self) -> None:
        from coordinator.observed import Observed

        self.observed = Observed()

    def seen(self, model: str) -> Any:
        return self.observed


class _Registry:
    def release(self, node: Any, model: str) -> None:
        pass

    def set_suspect(self, node: Any, suspect: bool) -> None:
        pass


async def run(streams: int, chunks: int) -> dict[str, Any]:
    from coordinator.answer_stream import EventStream
    from coordinator.served import NodeAttempt
    from meshgate.token_frames import ChunkDecoder, ChunkEncoder
    from tests.tunnel.mux_pair import mux_pair
    from tunnel import Frame, FrameType, Stream

    raw = [token_chunk(i) for i in range(chunks)]

    async def answer(stream: Stream, frame: Frame) -> None:
        encoder = ChunkEncoder()
        for chunk in raw:
            for body in encoder.encode_batch([chunk]):
                await stream.send(FrameType.DATA, body)
            await asyncio.sleep(0)  # one read of the runner: one token
        await stream.send(FrameType.END, {"usage": {"prompt_tokens": 3,
                                                    "completion_tokens": chunks}})

    sent = [0]

    async def one() -> None:
        stream = await pair.coord_mux.open({"request_id": "r"})
        decoder = ChunkDecoder()
        first = decoder.decode_many((await stream.recv()).body)[0]
        loop = asyncio.get_running_loop()
        request = types.SimpleNamespace(request_id="r", stream=True,
                                        endpoint="/v1/chat/completions")
        served = NodeAttempt(_Registry(), _Node(), stream, request, "m",  # type: ignore[arg-type]
                             first=first, started=time.perf_counter(), tries=1,
                             deadline=loop.time() + 120, idle_timeout=60)
        served.decoder = decoder
        never: asyncio.Future[Any] = loop.create_future()

        async def receive() -> Any:
            return await never

        async def send(message: Any) -> None:
            sent[0] += 1

        async def commit(row: dict[str, Any]) -> None:
            pass

        response = EventStream(served, commit, "k", None, include_usage=False, headers={})
        await response({"type": "http"}, receive, send)

    pair = await mux_pair(node_on_stream=answer)
    try:
        await asyncio.gather(*(one() for _ in range(20)))  # warm
        sent[0] = 0
        profile = cProfile.Profile()
        cpu = time.process_time()
        profile.enable()
        await asyncio.gather(*(one() for _ in range(streams)))
        profile.disable()
        cpu = time.process_time() - cpu
    finally:
        await pair.close()
    frames = streams * chunks
    groups: collections.Counter[str] = collections.Counter()
    rows = []
    stats: dict[Any, Any] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    for (file, line, name), (_, calls, own, _, _) in stats.items():
        where = file.removeprefix(str(ROOT) + "/")
        if where.startswith("tunnel/"):
            group = where
        elif where.split("/")[0] in ("coordinator", "meshgate", "node_agent", "tests"):
            group = where.split("/")[0]
        elif file == "~":
            group = "builtins"
        else:
            group = "stdlib and libraries"
        groups[group] += calls
        rows.append((calls / frames, own / frames * 1e6, f"{where}:{line}({name})"))
    rows.sort(key=lambda row: -row[0])
    return {"root": str(ROOT), "calls_a_frame": sum(groups.values()) / frames,
            "groups": {k: round(v / frames, 2) for k, v in groups.most_common()},
            "top": [(round(n, 2), round(us, 2), name) for n, us, name in rows[:60]],
            "client_sends_a_frame": round(sent[0] / frames, 3),
            "cpu_us_a_frame_profiled": round(cpu / frames * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--against", type=Path, metavar="DIR")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import uvloop

    results = [uvloop.run(run(args.streams, args.chunks))]
    if args.json_only:
        print(json.dumps(results[0]))
        return
    if args.against is not None:
        env = {**os.environ, "STREAM_PATH_ROOT": str(args.against.resolve())}
        out = subprocess.run(
            [sys.executable, __file__, "--streams", str(args.streams), "--chunks",
             str(args.chunks), "--json-only"], env=env, check=True, capture_output=True,
            text=True, cwd=args.against).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    for result in results:
        print(f"{result['root']}: {result['calls_a_frame']:.1f} Python calls a token frame "
              f"(client sends a frame {result['client_sends_a_frame']}; profiled CPU "
              f"{result['cpu_us_a_frame_profiled']} us a frame, noisy)")
        print("  by place:", result["groups"])
        for calls, own, name in result["top"][:args.top]:
            print(f"  {calls:7.2f} calls {own:6.2f} us own  {name}")


if __name__ == "__main__":
    main()
