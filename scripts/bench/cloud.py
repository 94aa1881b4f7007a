"""Added latency of cloud fallback through the coordinator versus calling the upstream directly.

    .venv/bin/python scripts/bench/cloud.py [--upstream llama|fake] [--requests 100]
        [--max-tokens 8] [--chunks 64] [--json OUT.json]

Starts an OpenAI-compatible "cloud" on loopback (``llama``: llama-cpp-python's own
server with the SmolLM2 file, behind an API key; ``fake``: the instant fake upstream
``tests/node/fake_openai_server.py``, named a fake, so only meshgate's cost shows) and a
real coordinator (subprocess, SQLite store) whose coordinator.toml has that cloud as its
only ``[[upstream]]``. No node is enrolled, so every request through the coordinator is
a cloud fallback. The same request is timed two ways, interleaved round-robin so drift
hits both alike:

* ``direct``: straight to the upstream with its key;
* ``coordinator``: through the coordinator's API with an API key (route, dispatch,
  upstream call, streaming pass-through, ledger row).

For each shape (non-streaming, streaming) it prints p50 and p99, the p50 ratio against
``direct`` and the added p50 in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import (  # noqa: E402
    measure_shapes,
    model_path,
    publish,
    start_fake_upstream,
)

from tests.e2e.mesh import Mesh, free_port, wait_until  # noqa: E402

MODEL = "bench"
KEY_ENV = "MG_BENCH_CLOUD_KEY"


def start_llama_cloud(root: Path, secret: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve().parents[2] / "tests" / "llama_server.py"),
            "--model",
            model_path(),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--api_key",
            secret,
            "--model_alias",
            "cloud-model",
            "--n_ctx",
            "2048",
            "--verbose",
            "false",
        ],
        stdout=(root / "cloud.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    wait_until(
        lambda: (
            httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {secret}"}).status_code
            == 200
        ),
        90,
        "llama cloud",
    )
    return proc, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", choices=["llama", "fake"], default="llama")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=64, help="fake: chunks per streamed answer")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    secret = "sk-bench-" + secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="mg-bench-cloud-") as tmp:
        root = Path(tmp)
        mesh = Mesh(root=root, api_port=free_port(), tunnel_port=free_port())
        cleanup: list[Callable[[], None]] = [mesh.stop]
        try:
            if args.upstream == "llama":
                cloud, url = start_llama_cloud(root, secret)
            else:
                cloud, url = start_fake_upstream(root, args.chunks, name="cloud-model")
            cleanup.append(cloud.kill)
            config = root / "coordinator.toml"
            config.write_text(
                f'[[upstream]]\nname = "bench-cloud"\nbase_url = "{url}"\n'
                f'api_key_env = "{KEY_ENV}"\nmodels = {{ {MODEL} = "cloud-model" }}\n'
                "price_per_1k_prompt = 0.1\nprice_per_1k_completion = 0.2\n"
            )
            mesh.start_coordinator(
                "--config", str(config), "--log-level", "warning", env={KEY_ENV: secret}
            )
            mesh.key = mesh.make_key("bench")
            targets = {
                "direct": (
                    httpx.Client(timeout=120, headers={"Authorization": f"Bearer {secret}"}),
                    url,
                ),
                "coordinator": (
                    httpx.Client(timeout=120, headers={"Authorization": f"Bearer {mesh.key}"}),
                    mesh.api,
                ),
            }
            rows = measure_shapes(targets, args.max_tokens, args.requests, args.warmup)
        finally:
            for step in reversed(cleanup):
                step()
    what = (
        f"llama-cpp-python server with SmolLM2-135M Q4_1 (CPU), max_tokens={args.max_tokens}"
        if args.upstream == "llama"
        else f"instant fake upstream, {args.chunks} chunks per stream"
    )
    publish(f"cloud fallback overhead: {what}; {args.requests} requests per path", rows, args.json)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
