"""What the Ollama runtime tests share: the fake Ollama servers they run (module-scoped
fixtures are made per module from these) and small helpers to read what the fake saw."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from tests.node.fake_ollama_server import CANNED, running

TEXT = "".join(w if i == 0 else " " + w for i, w in enumerate(CANNED))
HELLO: Any = [{"role": "user", "content": "Say hello to me."}]  # 4 words: the fake's prompt count
MODELS = ("llama3.2:latest", "smol:latest", "nomic-embed-text:latest=embedding")


def run_fake() -> Iterator[str]:
    """The fake with :data:`MODELS`."""
    flags = [arg for m in MODELS for arg in ("--model", m)]
    with running(*flags) as url:
        yield url


def run_slow() -> Iterator[str]:
    """The fake sending a chunk every 0.2 s."""
    with running("--model", "llama3.2:latest", "--chunk-delay", "0.2") as url:
        yield url


def streams(url: str) -> dict[str, int]:
    counts: dict[str, int] = httpx.get(f"{url}/_fake/streams").json()
    return counts


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def recorded(url: str, path: str) -> dict[str, Any]:
    """The last body the fake received on `path`."""
    bodies = [r["body"] for r in httpx.get(f"{url}/_fake/requests").json() if r["path"] == path]
    assert bodies, path
    last: dict[str, Any] = bodies[-1]
    return last


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "llama3.2:latest", **fields}).encode()
