"""Hot swap and runner behaviour with real parts: llama.cpp runner processes serving
the real SmolLM2 model, the node proxy on a loopback port, the official `openai`
client, and the coordinator's COMMAND frame over a real tunnel.

Two "models" are the same GGUF under two runner configs (n_ctx 512 and 1024)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from node_agent.inventory import read_model_file
from node_agent.link import CoordinatorLink
from node_agent.models import ModelManager
from node_agent.placement import Budget, place
from node_agent.runtimes.llama.supervisor import socket_path
from node_agent.state import Enrollment
from tests.node.proxy_thread import ProxyThread
from tests.tunnel.mux_pair import mux_pair
from tunnel import Frame, FrameType, Identity

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MODEL = "chat"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]
GiB = 1 << 30


class Node(ProxyThread):
    """A model manager (one real runner) and the proxy in front of it, on their own thread."""

    def __init__(self, run_dir: Path, model_path: Path, budget: Budget) -> None:
        self.run_dir = run_dir
        manager = ModelManager(run_dir=run_dir, budget=budget)
        manager.add_llama(MODEL, model_path, n_ctx=512)
        super().__init__(manager)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.manager.stats()[MODEL]
        return stats

    def health(self) -> dict[str, Any]:
        """The current runner's own /health (its pid, how many it served)."""
        sock = socket_path(self.run_dir, self.stats()["runner"])
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as client:
            data: dict[str, Any] = client.get("http://runner/health").json()
        return data


def need(model_path: Path, n_ctx: int) -> int:
    return place([read_model_file(model_path)], n_ctx, Budget(1 << 40, 0)).ram_bytes


@pytest.fixture
def node(tmp_path: Path, model_path: Path, request: pytest.FixtureRequest) -> Iterator[Node]:
    room = getattr(request, "param", "both")
    both = Budget(8 * GiB, 0)
    one = Budget(max(need(model_path, 512), need(model_path, 1024)) + (1 << 20), 0)
    node = Node(tmp_path, model_path, both if room == "both" else one)
    node.start()
    yield node
    node.stop()


class Clients:
    """`n` threads asking the node one chat completion after another, with the openai client."""

    def __init__(self, node: Node, n: int = 4, most: int = 40) -> None:
        self.node, self.most = node, most
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.started_after_swap = 0
        self.swapped = threading.Event()
        self.after = threading.Event()  # enough requests started after the swap
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        client = openai.OpenAI(base_url=f"{self.node.url}/v1", api_key="x", max_retries=0)
        for _ in range(self.most):
            after = self.swapped.is_set()
            try:
                reply = client.chat.completions.create(
                    model=MODEL, messages=HELLO, max_tokens=6, temperature=0
                )
                assert reply.model == MODEL
                assert reply.choices[0].message.content
            except Exception as exc:  # every failure is counted and shown
                with self.lock:
                    self.failures.append(repr(exc))
                continue
            with self.lock:
                self.ok += 1
                self.started_after_swap += after
                if self.started_after_swap >= 8:
                    self.after.set()
                    return

    def wait_for(self, ok: int) -> None:
        deadline = time.monotonic() + 60
        while self.ok < ok:
            assert time.monotonic() < deadline, f"only {self.ok} answers"
            time.sleep(0.02)

    def join(self) -> None:
        for t in self.threads:
            t.join(120)


@pytest.mark.parametrize(
    ("node", "mode"), [("both", "overlap"), ("one", "drain-first")], indirect=["node"]
)
def test_a_swap_under_load_drops_no_request(node: Node, model_path: Path, mode: str) -> None:
    old_pid = node.stats()["pid"]
    clients = Clients(node)
    clients.wait_for(6)
    reply = httpx.post(
        f"{node.url}/meshgate/swap",
        timeout=120,
        json={"model": MODEL, "to": f"smol-1k={model_path}", "n_ctx": 1024},
    )
    assert reply.status_code == 200, reply.text
    clients.swapped.set()
    result = reply.json()
    assert result["mode"] == mode
    assert (result["from"]["n_ctx"], result["to"]["n_ctx"]) == (512, 1024)
    assert result["from"]["pid"] == old_pid
    clients.join()
    assert clients.failures == []
    assert clients.started_after_swap >= 8
    stats = node.stats()
    assert (stats["state"], stats["swaps"], stats["n_ctx"]) == ("loaded", 1, 1024)
    assert stats["source"] == f"smol-1k={model_path}"
    health = node.health()
    assert health["pid"] == stats["pid"] == result["to"]["pid"] != old_pid
    assert health["model"] == MODEL  # the name apps use stays
    assert health["served"] >= clients.started_after_swap  # those all went to the new runner
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)  # the old runner is gone
    assert stats["served"] == clients.ok
    assert stats["in_flight"] == stats["queued"] == 0


def test_a_bad_swap_is_a_clear_error_and_the_old_runner_keeps_serving(node: Node) -> None:
    pid = node.stats()["pid"]
    for body, status, says in [
        ({"model": MODEL, "to": "/nowhere/x.gguf"}, 400, "no such model file"),
        ({"model": "nope", "to": "/nowhere/x.gguf"}, 404, "nope"),
        ({"model": MODEL}, 400, "missing 'to'"),
    ]:
        reply = httpx.post(f"{node.url}/meshgate/swap", json=body, timeout=30)
        assert reply.status_code == status
        assert says in reply.json()["error"]["message"]
    garbage = httpx.post(f"{node.url}/meshgate/swap", content=b"[1,", timeout=30)
    assert garbage.status_code == 400
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0)
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices
    assert node.stats()["pid"] == pid


def test_two_concurrent_streams_both_complete_in_turn(node: Node) -> None:
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0)
    prompt = "Count from 1 to 100: 1, 2, 3,"
    texts: list[str] = []
    usages: list[int] = []

    def stream() -> None:
        chunks = list(
            client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )
        )
        texts.append("".join(c.choices[0].text for c in chunks if c.choices))
        assert chunks[-1].usage is not None
        usages.append(chunks[-1].usage.completion_tokens)

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert usages == [30, 30]  # neither was cut short by the other
    assert texts[0] == texts[1]
    assert node.health()["cancelled"] == 0


def test_requests_in_flight_on_a_crashed_runner_fail_at_once_and_it_is_counted(
    node: Node,
) -> None:
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0)
    errors: list[openai.APIStatusError] = []

    def long() -> None:
        try:
            client.completions.create(
                model=MODEL, prompt="Count from 1 to 1000: 1, 2,", max_tokens=480, temperature=0
            )
        except openai.APIStatusError as exc:
            errors.append(exc)

    worker = threading.Thread(target=long)
    worker.start()
    deadline = time.monotonic() + 30
    while node.stats()["in_flight"] == 0 or node.health()["pending"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(node.stats()["pid"], signal.SIGKILL)
    worker.join(30)  # would hang on the dead runner otherwise
    assert not worker.is_alive()
    assert len(errors) == 1
    assert errors[0].status_code in (502, 503)
    assert MODEL in errors[0].message
    deadline = time.monotonic() + 60
    while node.stats()["restarts"] < 1:
        assert time.monotonic() < deadline, "the runner did not come back"
        time.sleep(0.05)
    stats = node.stats()
    assert (stats["crashes"], stats["restarts"], stats["in_flight"]) == (1, 1, 0)
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices


async def test_the_coordinator_commands_a_swap_over_the_tunnel(
    model_path: Path,
    tmp_path: Path,
) -> None:
    manager = ModelManager(run_dir=tmp_path, budget=Budget(8 * GiB, 0))
    manager.add_llama(MODEL, model_path, n_ctx=512)
    await manager.start()
    enrollment = Enrollment("ws://unused", b"k" * 32, "did:key:test", {}, 0.0)
    link = CoordinatorLink(Identity.generate(), enrollment, manager)
    results: asyncio.Queue[Any] = asyncio.Queue()
    muxes: list[Any] = []

    async def on_node_control(frame: Frame) -> None:
        await link._control(muxes[0], frame)

    async def on_coord_control(frame: Frame) -> None:
        if frame.type == FrameType.RESULT:
            await results.put(frame.body)

    pair = await mux_pair(node_on_control=on_node_control, coord_on_control=on_coord_control)
    muxes.append(pair.node_mux)
    try:
        old = manager.stats()[MODEL]["pid"]
        await pair.coord_mux.send_control(
            FrameType.COMMAND,
            {"id": "c1", "op": "swap", "model": MODEL, "to": f"{model_path}", "n_ctx": 768},
        )
        await pair.coord_mux.send_control(FrameType.COMMAND, {"id": "c2", "op": "explode"})
        answers = {}
        for _ in range(2):
            body = await asyncio.wait_for(results.get(), 120)
            answers[body["id"]] = body
        assert answers["c2"]["ok"] is False
        assert answers["c2"]["error"]["status"] == 400
        assert "unknown op 'explode'" in answers["c2"]["error"]["message"]
        swapped = answers["c1"]
        assert (swapped["ok"], swapped["op"]) == (True, "swap")
        assert swapped["result"]["to"]["n_ctx"] == 768
        assert manager.stats()[MODEL]["pid"] == swapped["result"]["to"]["pid"] != old
    finally:
        await pair.close()
        await manager.stop()


def test_the_cli_swaps_through_the_local_proxy(node: Node, model_path: Path) -> None:
    from typer.testing import CliRunner

    from node_agent.cli import app

    old = node.stats()["pid"]
    cli = CliRunner()
    done = cli.invoke(
        app, ["swap", MODEL, f"smol={model_path}", "--n-ctx", "768", "--url", node.url]
    )
    assert done.exit_code == 0, done.output
    assert f"{MODEL} now served from {model_path}" in done.output
    assert node.stats()["pid"] != old
    assert node.stats()["n_ctx"] == 768
    refused = cli.invoke(app, ["swap", "nope", f"{model_path}", "--url", node.url])
    assert refused.exit_code == 1
    assert "swap refused (404)" in refused.output
