"""A daemon stopped by SIGTERM (systemd's stop) stops its runners first: nothing is orphaned."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.e2e.mesh import Mesh, mesh_at, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    yield from mesh_at(tmp_path)


def runner_pid(mesh: Mesh, node: str, model: str) -> int:
    telemetry = httpx.get(mesh.proxy(node).removesuffix("/v1") + "/meshgate/telemetry").json()
    pid = telemetry["runtime"][model]["pid"]
    assert isinstance(pid, int)
    return pid


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_stopped_node_stops_its_llama_runner(mesh: Mesh, model_path: Path, sig: int) -> None:
    node = mesh.start_node("solo", f"smollm2={model_path}")
    wait_until(
        lambda: httpx.get(mesh.proxy("solo") + "/models").status_code == 200,
        120,
        "node proxy",
        [node],
    )
    pid = runner_pid(mesh, "solo", "smollm2")
    runner = psutil.Process(pid)
    assert runner.is_running()

    code = node.stop(sig, timeout=30)

    if sig == signal.SIGKILL:  # no shutdown ran: the runner notices its parent is gone
        assert code == -signal.SIGKILL
    else:
        assert code == 0, node.log_text()[-2000:]
        assert "node stopped" in node.log_text()
    runner.wait(10)  # raises TimeoutExpired if the runner outlived its daemon
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(pid)  # reaped and gone, not re-parented to init


def test_a_node_stopped_mid_stream_finishes_the_stream_first(
    mesh: Mesh, model_path: Path
) -> None:
    mesh.start_coordinator()
    mesh.key = mesh.make_key("drain")
    assert mesh.enroll("node-a").returncode == 0
    node = mesh.start_node("node-a", f"smollm2={model_path}")
    mesh.wait_serving("smollm2")
    client = openai.OpenAI(base_url=mesh.api, api_key=mesh.key, max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Tell me a long story about a lighthouse."}],
        max_tokens=120,
        temperature=0,
        stream=True,
    )
    chunks = 0
    finish = None
    for chunk in stream:
        chunks += 1
        if chunks == 3:  # tokens are flowing: systemd stops the node now
            node.popen.send_signal(signal.SIGTERM)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish in {"length", "stop"}  # a complete answer, no error event
    assert chunks > 3
    assert node.popen.wait(60) == 0
    assert "draining the tunnel" in node.log_text()
