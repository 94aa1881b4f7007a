"""Per-request overhead of meshgate's two request paths, measured side by side.

    .venv/bin/python scripts/bench/overhead.py [--runtime fake|llama] [--requests 200]
        [--chunks 64] [--max-tokens 16] [--json OUT.json]

Starts a real coordinator and a real enrolled node (subprocesses, loopback
websockets tunnel, SQLite store) in a temporary directory, then times the same
request three ways, interleaved round-robin (the order turning every round; or in blocks
of K requests a path with ``--block K``, see ``measure``) so that drift,
and the work one path does after its answer left, hit all of them alike:

* ``direct``: straight to the runner the node uses;
* ``node``: through the node's local OpenAI proxy (the app-on-the-box path);
* ``coordinator``: through the coordinator's API, the encrypted tunnel and the
  node (the remote path);
* ``litellm`` (with ``--runtime fake``, when LiteLLM's proxy is installed): the
  same upstream behind LiteLLM's own proxy server, the yardstick for the node's
  local port (issue 10: the node's added p50 at most 0.05x LiteLLM's).

Before/after in one run: ``--against DIR`` starts a second coordinator and node
running the code of another checkout (``git worktree add /tmp/base main``), and
``--against-env NAME=VALUE`` (repeatable) sets environment variables for that second
pair only (``--against-env MESHGATE_LOOP=asyncio`` compares a loop on this tree);
its path is ``coordinator-b``, timed in the same rounds as the others.

LiteLLM is a bench tool, never a meshgate dependency: install it in a venv of
its own and name its ``litellm`` command with ``--litellm`` (default: ``litellm``
on PATH)::

    python3 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'
    .venv/bin/python scripts/bench/overhead.py --chunks 16 --litellm /tmp/litellm-venv/bin/litellm

``--runtime fake`` puts an instant OpenAI-compatible upstream behind the node
(``tests/node/fake_openai_server.py``, named a fake: canned words, no model) so
only meshgate's own cost shows; ``--runtime llama`` serves the real SmolLM2
model and calls its llama.cpp runner directly on its unix socket.

For each path and shape (non-streaming, streaming) it prints p50 and p99 of the
wall time, the p50 ratio against ``direct`` and the added p50 in milliseconds.
Absolute times depend on the box; the ratios and the added milliseconds are the
numbers to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from node_agent.runtimes.llama.supervisor import socket_path  # noqa: E402
from tests.e2e.mesh import Mesh, free_port, wait_until  # noqa: E402

MODEL = "bench"
#: LiteLLM's proxy refuses to start without a master key; clients send it as their key.
LITELLM_KEY = "sk-bench-" + secrets.token_hex(16)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_request(client: httpx.Client, url: str, body: dict[str, Any]) -> float:
    """Send one request, read all of the answer, return seconds; fail loudly on a bad answer."""
    started = time.perf_counter()
    if body.get("stream"):
        chunks = 0
        with client.stream("POST", url, json=body) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    chunks += 1
                    if line == "data: [DONE]":
                        break
        elapsed = time.perf_counter() - started
        if chunks < 2 or line != "data: [DONE]":
            raise RuntimeError(f"{url}: stream ended early after {chunks} events")
        return elapsed
    reply = client.post(url, json=body)
    elapsed = time.perf_counter() - started
    reply.raise_for_status()
    if not reply.json()["choices"]:
        raise RuntimeError(f"{url}: no choices in {reply.text[:200]}")
    return elapsed


def measure(
    targets: dict[str, tuple[httpx.Client, str]],
    body: dict[str, Any],
    requests: int,
    warmup: int,
    block: int = 1,
) -> dict[str, list[float]]:
    """``requests`` timed requests per path, ``block`` of them in a row per path.

    block 1 (the default): the paths take turns request by request, the order turning
    every round: what a path still does after its answer left (a daemon's access line and
    metrics, LiteLLM's logging) runs while the next path is timed, so each path follows
    each other one equally often. That work lands on whichever path comes next, and a
    path with more hops (more processes waiting for a core) absorbs more of it.
    block K > 1: each path answers K requests in a row (the order of the paths turning
    every round of blocks), so a path's own after-work slows mostly its own next request;
    the first request of a block, the one that follows another path, is not counted.
    """
    times: dict[str, list[float]] = {name: [] for name in targets}
    names = list(targets)
    counted = block - 1 if block > 1 else 1  # timed requests a path gives per round
    rounds = -(-(warmup + requests) // counted)
    for i in range(rounds):
        turn = i % len(names)
        for name in names[turn:] + names[:turn]:
            client, base = targets[name]
            for j in range(block):
                elapsed = one_request(client, f"{base}/chat/completions", body)
                if block > 1 and j == 0:
                    continue  # follows another path: its after-work, not this path's
                times[name].append(elapsed)
    return {name: values[warmup:warmup + requests] for name, values in times.items()}


def report(shape: str, times: dict[str, list[float]]) -> list[dict[str, Any]]:
    base = statistics.median(times["direct"])
    rows = []
    for name, values in times.items():
        p50 = statistics.median(values)
        rows.append(
            {
                "shape": shape,
                "path": name,
                "n": len(values),
                "p50_ms": p50 * 1000,
                "p99_ms": percentile(values, 0.99) * 1000,
                "p50_ratio": p50 / base,
                "added_p50_ms": (p50 - base) * 1000,
            }
        )
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'shape':<12}{'path':<13}{'n':>5}{'p50 ms':>10}{'p99 ms':>10}{'ratio':>8}{'+p50 ms':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['shape']:<12}{r['path']:<13}{r['n']:>5}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}"
            f"{r['p50_ratio']:>8.2f}{r['added_p50_ms']:>10.2f}"
        )


def measure_shapes(
    targets: dict[str, tuple[httpx.Client, str]], max_tokens: int, requests: int, warmup: int,
    block: int = 1,
) -> list[dict[str, Any]]:
    """The same chat request, non-streaming then streaming, on every target, interleaved."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    rows = report("non-stream", measure(targets, body, requests, warmup, block))
    stream = {**body, "stream": True}
    return rows + report("stream", measure(targets, stream, requests, warmup, block))


def publish(title: str, rows: list[dict[str, Any]], json_path: Path | None) -> None:
    print(f"{title}, interleaved")
    print_rows(rows)
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))


def start_fake_upstream(
    root: Path, chunks: int, name: str = MODEL
) -> tuple[subprocess.Popen[bytes], str]:
    """The FAKE OpenAI server of the tests (canned words, no model), instant, on a port."""
    port = free_port()
    log = (root / "fake-upstream.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests/node/fake_openai_server.py"),
            "--port",
            str(port),
            "--name",
            name,
            "--chunks",
            str(chunks),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    wait_until(lambda: httpx.get(f"{url}/models").status_code == 200, 30, "fake upstream")
    return proc, url


def start_litellm(
    root: Path, command: str, upstream: str
) -> tuple[subprocess.Popen[bytes], str]:
    """LiteLLM's proxy server (its own process, one worker) in front of `upstream`."""
    config = root / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {upstream}\n"
        "      api_key: fake-key\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
        "  telemetry: false\n"
    )
    port = free_port()
    log = (root / "litellm.log").open("wb")
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
           "DISABLE_SCHEMA_UPDATE": "true", "LITELLM_MASTER_KEY": LITELLM_KEY}
    proc = subprocess.Popen(
        [command, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
         "--num_workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"litellm exited: {(root / 'litellm.log').read_text()[-2000:]}")
        return httpx.get(f"{url}/health/liveliness", timeout=2).status_code == 200

    wait_until(ready, 300, "litellm proxy")
    return proc, f"{url}/v1"


def summarize(rows: list[dict[str, Any]]) -> list[str]:
    """The node's and the coordinator's added p50 as fractions of LiteLLM's, per shape (the
    targets of issues 10 and 13)."""
    lines = []
    for shape in ("non-stream", "stream"):
        added = {r["path"]: r["added_p50_ms"] for r in rows if r["shape"] == shape}
        if "litellm" not in added or added["litellm"] <= 0:
            continue
        for path in ("node", "coordinator", "coordinator-b"):  # issue 10's target; issue 13's
            if path in added:
                lines.append(
                    f"{shape}: {path} adds {added[path]:.2f} ms p50, litellm "
                    f"{added['litellm']:.2f} ms: {path}/litellm = "
                    f"{added[path] / added['litellm']:.3f}"
                )
    return lines


def against_env(tree: Path | None, pairs: list[str]) -> dict[str, str]:
    """The environment of the second coordinator and node: `tree`'s code first on the
    path (PYTHONSAFEPATH: not this checkout's, which ``-m`` would put first), then `pairs`."""
    env: dict[str, str] = {}
    if tree is not None:
        if not (tree / "coordinator" / "cli.py").is_file():
            raise SystemExit(f"--against {tree}: not a meshgate checkout")
        env |= {"PYTHONPATH": str(tree.resolve()), "PYTHONSAFEPATH": "1"}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--against-env wants NAME=VALUE, not {pair!r}")
        env[name] = value
    return env


def start_pair(root: Path, node_args: tuple[str, ...], cleanup: list[Callable[[], None]],
               env: dict[str, str] | None = None, node_env: dict[str, str] | None = None
               ) -> Mesh:
    """A coordinator (`env`) and one enrolled node (`node_env`, else `env`) serving MODEL;
    its stop goes on `cleanup` before anything starts."""
    root.mkdir(parents=True, exist_ok=True)
    mesh = Mesh(root=root, api_port=free_port(), tunnel_port=free_port())
    cleanup.append(mesh.stop)
    mesh.start_coordinator(env=env)
    mesh.key = mesh.make_key("bench")
    enrolled = mesh.enroll("node-a")
    if enrolled.returncode:
        raise SystemExit(f"enroll failed: {enrolled.stderr}")
    mesh.start_node("node-a", extra=node_args, env=env if node_env is None else node_env)
    mesh.wait_serving(MODEL)
    return mesh


def model_path() -> str:
    out = subprocess.run(
        [str(ROOT / "scripts/fetch_model.sh")], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", choices=["fake", "llama"], default="fake")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--chunks", type=int, default=64, help="fake: chunks per streamed answer")
    parser.add_argument("--max-tokens", type=int, default=16, help="llama: tokens per answer")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--block", type=int, default=1, metavar="K",
                        help="K requests in a row per path (1: turn by turn; see measure())")
    parser.add_argument(
        "--litellm", default=shutil.which("litellm"),
        help="LiteLLM's `litellm` command (fake runtime only; default: on PATH)",
    )
    parser.add_argument("--no-coordinator", action="store_true",
                        help="leave out the coordinator path (node and litellm only)")
    parser.add_argument("--against", type=Path, metavar="DIR",
                        help="a second coordinator and node run this checkout's code "
                             "(path coordinator-b)")
    parser.add_argument("--against-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of the second coordinator and node only")
    args = parser.parse_args()
    second = bool(args.against or args.against_env)
    env_b = against_env(args.against, args.against_env) if second else None

    with tempfile.TemporaryDirectory(prefix="mg-bench-") as tmp:
        root = Path(tmp)
        cleanup: list[Callable[[], None]] = []
        try:
            if args.runtime == "fake":
                fake, upstream = start_fake_upstream(root, args.chunks)
                cleanup.append(fake.kill)
                node_args: tuple[str, ...] = ("--upstream", f"{MODEL}={upstream}")
                direct = httpx.Client(timeout=60)
            else:
                node_args = ("--model", f"{MODEL}={model_path()}")
            mesh = start_pair(root / "a", node_args, cleanup)
            if args.runtime == "llama":
                base = mesh.proxy("node-a").removesuffix("/v1")
                runner = httpx.get(base + "/meshgate/telemetry").json()["runtime"][MODEL]["runner"]
                sock = socket_path(root / "a" / "node-a" / "run", runner)  # named per runner
                direct = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=60)
                upstream = "http://runner/v1"
            auth = {"Authorization": f"Bearer {mesh.key}"}
            targets = {
                "direct": (direct, upstream),
                "node": (httpx.Client(timeout=60), mesh.proxy("node-a")),
            }
            if not args.no_coordinator:
                targets["coordinator"] = (httpx.Client(timeout=60, headers=auth), mesh.api)
            if second:
                other = start_pair(root / "b", node_args, cleanup, env_b)
                targets["coordinator-b"] = (httpx.Client(
                    timeout=60, headers={"Authorization": f"Bearer {other.key}"}), other.api)
            if args.runtime == "fake" and args.litellm:
                litellm, litellm_url = start_litellm(root, args.litellm, upstream)
                cleanup.append(litellm.kill)
                litellm_auth = {"Authorization": f"Bearer {LITELLM_KEY}"}
                targets["litellm"] = (httpx.Client(timeout=60, headers=litellm_auth), litellm_url)
            elif args.runtime == "fake":
                print("no litellm command (see --litellm): the litellm column is left out")
            rows = measure_shapes(targets, args.max_tokens, args.requests, args.warmup,
                                  args.block)
        finally:
            for step in reversed(cleanup):
                step()
    what = (
        f"instant fake upstream, {args.chunks} chunks per stream"
        if args.runtime == "fake"
        else f"SmolLM2-135M Q4_1 on llama.cpp (CPU), max_tokens={args.max_tokens}, temperature 0"
    )
    order = "turn by turn" if args.block <= 1 else f"in blocks of {args.block}"
    publish(f"meshgate request overhead: {what}; {args.requests} requests per path, {order}",
            rows, args.json)
    for line in summarize(rows):
        print(line)
    if second:
        print(f"coordinator-b: {args.against or 'this checkout'} with "
              f"{' '.join(args.against_env) or 'the same environment'}")
    print(f"load average while it ran: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} "
          "cores")


if __name__ == "__main__":
    main()
