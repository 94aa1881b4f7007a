"""The coordinator learns a node's telemetry and inventory over the real tunnel.

The coordinator's tunnel endpoint, gateway and registry run in this test's
event loop (so the test reads the registry the scheduler reads); the node is
a real `meshgate-node run` subprocess enrolled with a real token. A GGUF file
added to the node's model directory while it runs reaches the coordinator as
a new INVENTORY frame; so does a broken one, marked unusable with the reason.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coordinator.gateway import Gateway
from coordinator.registry import NodeConn, Registry
from coordinator.state import StateDir
from coordinator.store import Store
from tests.e2e.mesh import Proc, free_port
from tests.node.fake_nvml import load_fixture
from tunnel import serve as serve_tunnel

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


@dataclass
class Coordinator:
    state_dir: Path
    registry: Registry
    url: str


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    state = StateDir(tmp_path / "coordinator")
    store = Store(state.db_url)
    registry = Registry()
    gateway = Gateway(store, registry)
    server = await serve_tunnel(
        "127.0.0.1", 0, state.static_key(), gateway.authorize, gateway.on_link
    )
    port = next(iter(server.sockets)).getsockname()[1]
    try:
        yield Coordinator(state.path, registry, f"ws://127.0.0.1:{port}")
    finally:
        server.close()
        await server.wait_closed()
        store.close()


async def until(check: Callable[[], Any], within: float, what: str, proc: Proc) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"node exited while waiting for {what}:\n{proc.log_text()}")
        value = check()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{proc.log_text()[-3000:]}")


async def enroll(coordinator: Coordinator, node_dir: Path) -> Path:
    created = await asyncio.to_thread(
        cli,
        "coordinator.cli",
        "token",
        "create",
        "--state-dir",
        str(coordinator.state_dir),
        "--tunnel-url",
        coordinator.url,
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    enrolled = await asyncio.to_thread(
        cli, "node_agent.cli", "enroll", token, "--state-dir", str(node_dir)
    )
    assert enrolled.returncode == 0, enrolled.stderr
    return node_dir


def first_node(coordinator: Coordinator) -> NodeConn | None:
    nodes = coordinator.registry.nodes()
    return nodes[0] if nodes and nodes[0].telemetry and nodes[0].inventory else None


async def test_served_model_reaches_the_coordinator_with_its_memory(
    coordinator: Coordinator, tmp_path: Path, model_path: Path
) -> None:
    """A model dir with a real model and a broken file: the model is served, the file is not."""
    node_dir = await enroll(coordinator, tmp_path / "node")
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (model_dir / "smol.gguf").symlink_to(model_path)
    (model_dir / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    proc = start_node(node_dir, model_dir, tmp_path / "node.log", "--n-ctx", "512")
    try:
        conn: NodeConn = await until(lambda: first_node(coordinator), 120, "the node", proc)
        assert conn.models == ["smol"]
        (model,) = conn.inventory["models"]
        assert model["name"] == "smol"
        assert model["loaded"] is True
        assert model["kind"] == "llama.cpp"
        assert model["context_length"] == 512
        assert model["architecture"] == "llama"
        assert {f["name"]: f["usable"] for f in conn.inventory["files"]} == {
            "smol": True,
            "broken": False,
        }

        def runtime() -> dict[str, Any] | None:
            smol = conn.telemetry["runtime"].get("smol") or {}
            return smol if smol.get("rss_bytes") else None

        smol = await until(runtime, 30, "the runner's memory in telemetry", proc)
        assert isinstance(smol["pid"], int)
        assert smol["rss_bytes"] > 50 * 2**20  # the weights are in the runner
        assert smol["in_flight"] == 0
        assert smol["crashes"] == 0
        assert "not serving" in proc.log_text()  # the broken file was skipped, with its reason
    finally:
        proc.stop()


async def test_coordinator_learns_telemetry_and_model_files(
    coordinator: Coordinator, tmp_path: Path, model_path: Path
) -> None:
    node_dir = await enroll(coordinator, tmp_path / "node")
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    size = model_path.stat().st_size  # noqa: ASYNC240
    proc = start_node(node_dir, model_dir, tmp_path / "node.log")
    try:
        conn: NodeConn = await until(
            lambda: first_node(coordinator), 60, "the node's first telemetry", proc
        )
        host = conn.telemetry["host"]
        assert host["cpu_count"] == os.cpu_count()
        assert host["mem_total_bytes"] > 0
        gpus = conn.telemetry["gpus"]
        assert [g["uuid"] for g in gpus] == [
            g["uuid"] for g in load_fixture("nvml_rtx4090_x2.json")["gpus"]
        ]
        assert conn.telemetry["runtime"] == {}  # no models yet
        assert conn.inventory["files"] == []
        first_ts = conn.telemetry["ts"]
        await until(lambda: conn.telemetry["ts"] > first_ts, 10, "a second sample", proc)

        (model_dir / "smol.gguf").symlink_to(model_path)
        (model_dir / "broken.gguf").write_bytes(b"GGUF" + b"\xff" * 64)

        def files() -> dict[str, dict[str, Any]] | None:
            got = {f["name"]: f for f in conn.inventory.get("files", [])}
            return got if {"smol", "broken"} <= set(got) else None

        found = await until(files, 20, "the new files at the coordinator", proc)
        smol, broken = found["smol"], found["broken"]
        assert smol["usable"] is True
        assert smol["architecture"] == "llama"
        assert smol["context_length"] > 0
        assert smol["size_bytes"] == size
        assert broken["usable"] is False
        assert "GGUF" in broken["reason"]
        assert conn.inventory["model_dirs"] == [str(model_dir)]
    finally:
        proc.stop()


def start_node(node_dir: Path, model_dir: Path, log: Path, *extra: str) -> Proc:
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node_agent.cli",
                "run",
                "--state-dir",
                str(node_dir),
                "--proxy-port",
                str(free_port()),
                "--model-dir",
                str(model_dir),
                "--telemetry-period",
                "0.3",
                "--inventory-period",
                "0.3",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "MESHGATE_CONFIG": "",
                "MESHGATE_NVML_MODULE": "tests.node.fake_nvml:rtx4090_x2_power_unsupported",
            },
        )
    return Proc(popen, log)
