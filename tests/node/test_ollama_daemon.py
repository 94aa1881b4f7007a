"""A real `meshgate-node run --ollama URL` subprocess against the fake Ollama server:
the daemon starts while Ollama is down, serves its models once it is up,
picks up a new one, reports them in the inventory (source "ollama", loaded
from `ps`), and answers 503 when Ollama goes away."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.e2e.mesh import Proc, free_port, wait_until
from tests.node.fake_ollama_server import CANNED, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
TEXT = "".join(w if i == 0 else " " + w for i, w in enumerate(CANNED))
HELLO: Any = [{"role": "user", "content": "Say hello."}]


def served(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=5).json()["data"]}


def inventory(url: str) -> dict[str, Any]:
    reply = httpx.get(f"{url}/meshgate/inventory", timeout=5)
    assert reply.status_code == 200, reply.text
    data: dict[str, Any] = reply.json()
    return data


def entry(url: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in inventory(url)["models"] if m["name"] == name)
    return found


def test_the_daemon_serves_a_local_ollamas_models_and_follows_them(tmp_path: Path) -> None:
    ollama_port, proxy_port = free_port(), free_port()
    config = tmp_path / "node.toml"
    config.write_text("")
    log = tmp_path / "node.log"
    popen = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node_agent.cli",
            "run",
            "--config",
            str(config),
            "--state-dir",
            str(tmp_path / "state"),
            "--proxy-port",
            str(proxy_port),
            "--no-connect",
            "--ollama",
            f"http://127.0.0.1:{ollama_port}",
            "--ollama-period",
            "0.3",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    node = Proc(popen, log)
    url = f"http://127.0.0.1:{proxy_port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "node", [node])
        assert served(url) == set()  # Ollama is not up yet: the daemon runs anyway
        assert "ollama at" in node.log_text()
        with running("--model", "llama3.2:latest", port=ollama_port) as fake_url:
            wait_until(lambda: "llama3.2:latest" in served(url), 30, "ollama models", [node])
            client = ollama.Client(host=url)
            assert client.chat(model="llama3.2", messages=HELLO).message.content == TEXT

            first = entry(url, "llama3.2:latest")
            assert (first["source"], first["kind"]) == ("ollama", "ollama")
            assert inventory(url)["ollama"]["url"] == f"http://127.0.0.1:{ollama_port}"
            wait_until(lambda: entry(url, "llama3.2:latest")["loaded"], 30, "loaded via ps", [node])
            assert entry(url, "llama3.2:latest")["size_vram"]

            ollama.Client(host=fake_url).copy("llama3.2:latest", "qwen-copy")
            wait_until(lambda: "qwen-copy:latest" in served(url), 30, "a new model", [node])
            assert not entry(url, "qwen-copy:latest")["loaded"]
            assert client.chat(model="qwen-copy", messages=HELLO).eval_count == len(CANNED)

            ollama.Client(host=fake_url).delete("qwen-copy")
            wait_until(
                lambda: "qwen-copy:latest" not in served(url),
                30,
                "the deleted model no longer served",
                [node],
            )
            with pytest.raises(ollama.ResponseError) as caught:
                client.chat(model="qwen-copy", messages=HELLO)
            assert caught.value.status_code == 404
            assert "llama3.2:latest" in served(url)  # the others stay

        with pytest.raises(ollama.ResponseError) as caught:  # Ollama gone: a clear 503
            client.chat(model="llama3.2", messages=HELLO)
        assert caught.value.status_code == 503
        assert "unreachable" in caught.value.error
        assert node.popen.poll() is None
    finally:
        node.stop()
