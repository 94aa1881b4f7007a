"""Start a real coordinator and real nodes as subprocesses, the way an operator would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cli(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    module = {"coordinator": "coordinator.cli", "node": "node_agent.cli"}[tool]
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
    )


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout.strip().splitlines()[-1]


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def spawn(tool: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    module = {"coordinator": "coordinator.cli", "node": "node_agent.cli"}[tool]
    out = log.open("wb")
    popen = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    return Proc(popen, log)


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, procs: Sequence[Proc] = ()
) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.popen.poll() is not None:
                tail = proc.log_text()[-3000:]
                raise AssertionError(f"{proc.log.name} exited while waiting for {what}:\n{tail}")
        try:
            if check():
                return
        except Exception as exc:  # still starting
            last = exc
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.log.name}\n{p.log_text()[-3000:]}" for p in procs)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})\n{logs}")


@dataclass
class Mesh:
    root: Path
    api_port: int
    tunnel_port: int
    key: str = ""
    coordinator: Proc | None = None
    nodes: dict[str, Proc] = field(default_factory=dict)
    proxy_ports: dict[str, int] = field(default_factory=dict)

    @property
    def coord_state(self) -> Path:
        return self.root / "coordinator"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/v1"

    def proxy(self, node: str) -> str:
        return f"http://127.0.0.1:{self.proxy_ports[node]}/v1"

    def start_coordinator(self, *extra: str, env: dict[str, str] | None = None) -> None:
        self.coordinator = spawn(
            "coordinator",
            [
                "serve",
                "--state-dir",
                str(self.coord_state),
                "--api-host",
                "127.0.0.1",
                "--api-port",
                str(self.api_port),
                "--tunnel-host",
                "127.0.0.1",
                "--tunnel-port",
                str(self.tunnel_port),
                *extra,
            ],
            self.root / "coordinator.log",
            env=env,
        )
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{self.api_port}/healthz").status_code == 200,
            30,
            "coordinator",
            [self.coordinator],
        )

    def token(self, *extra: str) -> str:
        return last_line(
            cli("coordinator", "token", "create", "--state-dir", str(self.coord_state), *extra)
        )

    def make_key(self, name: str) -> str:
        return last_line(
            cli(
                "coordinator", "key", "create", "--state-dir", str(self.coord_state), "--name", name
            )
        )

    def enroll(self, node: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        return cli(
            "node",
            "enroll",
            token or self.token(),
            "--state-dir",
            str(self.root / node),
            check=False,
        )

    def start_node(
        self, node: str, *models: str, extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Proc:
        port = self.proxy_ports.setdefault(node, free_port())
        args = [
            "run",
            "--state-dir",
            str(self.root / node),
            "--proxy-port",
            str(port),
            "--telemetry-period",
            "0.5",
            *extra,
        ]
        for model in models:
            args += ["--model", model]
        proc = spawn("node", args, self.root / f"{node}.log", env=env)
        self.nodes[node] = proc
        return proc

    def connected_models(self) -> list[str]:
        reply = httpx.get(f"{self.api}/models", headers={"Authorization": f"Bearer {self.key}"})
        return [m["id"] for m in reply.json()["data"]]

    def node_models(self) -> list[str]:
        """What connected nodes serve (not the cloud models /v1/models also lists)."""
        models: list[str] = httpx.get(f"http://127.0.0.1:{self.api_port}/healthz").json()[
            "node_models"
        ]
        return models

    def wait_serving(self, model: str, timeout: float = 120) -> None:
        """Until a connected node serves `model` (and the API lists it)."""
        procs = [p for p in [self.coordinator, *self.nodes.values()] if p is not None]
        wait_until(
            lambda: model in self.node_models() and model in self.connected_models(),
            timeout,
            f"{model} served by a node",
            procs,
        )

    def connected_nodes(self) -> int:
        """How many nodes the running coordinator has live tunnels to (from /healthz)."""
        count: int = httpx.get(f"http://127.0.0.1:{self.api_port}/healthz").json()["nodes"]
        return count

    def nodes_json(self) -> list[dict[str, object]]:
        out = cli("coordinator", "nodes", "--state-dir", str(self.coord_state), "--json")
        data: list[dict[str, object]] = json.loads(out.stdout)
        return data

    def stop(self) -> None:
        for proc in self.nodes.values():
            proc.stop()
        if self.coordinator:
            self.coordinator.stop()


def mesh_at(root: Path) -> Iterator[Mesh]:
    mesh = Mesh(root=root, api_port=free_port(), tunnel_port=free_port())
    try:
        yield mesh
    finally:
        mesh.stop()
