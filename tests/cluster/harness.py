"""A real cluster for the e2e tests: replicas on one PostgreSQL and one Redis, HAProxy in
front of their API ports, real nodes (one with the real SmolLM2, others fronting the
FAKE OpenAI server of tests/node), all started as an operator would."""

from __future__ import annotations

import concurrent.futures
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.admin_keys import AdminKeys
from coordinator.state import StateDir
from coordinator.store import KeyScopes, Store
from tests.cluster.engines import PostgresServer, RedisServer, free_port, wait_port
from tests.e2e.mesh import Proc, cli, last_line, spawn, wait_until
from tunnel.token import EnrollmentToken

FAKE_SERVER = Path(__file__).resolve().parents[1] / "node" / "fake_openai_server.py"

HAPROXY_CFG = """
global
    maxconn 2000
defaults
    mode http
    timeout connect 1s
    timeout check 3s
    timeout client 60s
    timeout server 60s
    retries 3
    retry-on conn-failure
    option redispatch 1
frontend api
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /healthz
    http-response set-header X-Served-By %[srv_name]
{servers}
"""


@dataclass
class Replica:
    name: str
    state: Path
    api_port: int
    tunnel_port: int
    proc: Proc | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def health(self) -> dict[str, object]:
        data: dict[str, object] = httpx.get(f"{self.api}/healthz", timeout=2).json()
        return data

    def nodes(self) -> int:
        count = self.health()["nodes"]
        assert isinstance(count, int)
        return count


@dataclass
class Cluster:
    root: Path
    postgres: PostgresServer
    redis: RedisServer
    config: Path
    replicas: dict[str, Replica] = field(default_factory=dict)
    nodes: dict[str, Proc] = field(default_factory=dict)
    others: list[Proc] = field(default_factory=list)
    haproxy: subprocess.Popen[bytes] | None = None
    lb_port: int = 0

    @property
    def lb(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    @property
    def key_file(self) -> Path:
        """The cluster's static key, shared by every replica (made on first use)."""
        keys = StateDir(self.root / "cluster-key")
        keys.static_key()
        return keys.path / "coordinator_static.key"

    def start_replica(self, name: str) -> Replica:
        return self.start_replicas(name)[0]

    def start_replicas(self, *names: str) -> list[Replica]:
        """Start each replica at once, then wait for all."""
        started = []
        for name in names:
            replica = Replica(name, self.root / name, free_port(), free_port())
            replica.proc = spawn("coordinator", [
                "serve", "--state-dir", str(replica.state), "--api-host", "127.0.0.1",
                "--api-port", str(replica.api_port), "--tunnel-host", "127.0.0.1",
                "--tunnel-port", str(replica.tunnel_port), "--database-url", self.postgres.url,
                "--redis-url", self.redis.url, "--config", str(self.config), "--cache",
                "--log-format", "text", "--cluster-key", str(self.key_file),
            ], self.root / f"replica-{name}.log")
            self.replicas[name] = replica
            started.append(replica)
        for replica in started:
            wait_until(lambda r=replica: httpx.get(f"{r.api}/healthz").status_code == 200,
                       60, f"replica {replica.name}", [p for r in started if (p := r.proc)])
        return started

    def start_haproxy(self) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            pytest.skip("haproxy is not installed (apt-get install haproxy; scripts/test.sh "
                        "does it)")
        self.lb_port = free_port()
        servers = "\n".join(
            f"    server {r.name} 127.0.0.1:{r.api_port} check inter 300ms fall 2 rise 1"
            for r in self.replicas.values())
        cfg = self.root / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=self.lb_port, servers=servers))
        log = (self.root / "haproxy.log").open("ab")
        self.haproxy = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=log,
                                        stderr=subprocess.STDOUT)
        wait_port(self.lb_port)

    def start_fake_upstream(self, name: str, *extra: str) -> int:
        port = free_port()
        log = self.root / f"fake-{name}-{port}.log"
        out = log.open("wb")
        popen = subprocess.Popen([sys.executable, str(FAKE_SERVER), "--port", str(port),
                                  "--name", name, *extra], stdout=out, stderr=subprocess.STDOUT)
        self.others.append(Proc(popen, log))
        wait_port(port)
        return port

    def admin(self, *args: str) -> str:
        """An admin command run as an operator would (a subprocess) on replica a's box."""
        return last_line(cli("coordinator", *args, "--state-dir", str(self.root / "a")))

    def key(self, name: str, **scopes: Any) -> str:
        """An API key made in the shared store directly (the CLI costs seconds a call)."""
        store = Store(self.postgres.url)
        try:
            return store.create_key(name, time.time(), scopes=KeyScopes(**scopes))[1]
        finally:
            store.close()

    def admin_key(self, name: str) -> str:
        store = Store(self.postgres.url)
        try:
            return AdminKeys(store).create(name, time.time())[1]
        finally:
            store.close()

    def token(self, uses: int) -> str:
        """An enrollment token for replica a's tunnel, good for `uses` nodes."""
        a = self.replicas["a"]
        store = Store(self.postgres.url)
        try:
            token_id, secret = store.create_token(600, {}, time.time(), uses=uses)
        finally:
            store.close()
        return EnrollmentToken(url=f"ws://127.0.0.1:{a.tunnel_port}",
                               coordinator_key=StateDir(a.state).static_public(),  # the cluster's
                               token_id=token_id, secret=secret,
                               expires_at=int(time.time() + 600)).encode()

    def start_nodes(self, nodes: dict[str, tuple[str, ...]]) -> None:
        """Enroll (in parallel, one token) and start each node with its extra options."""
        token = self.token(len(nodes))

        def enroll(name: str) -> subprocess.CompletedProcess[str]:
            return cli("node", "enroll", token, "--state-dir", str(self.root / name),
                       check=False)

        with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
            for name, done in zip(nodes, pool.map(enroll, nodes), strict=True):
                assert done.returncode == 0, f"{name}: {done.stderr}"
        for name, extra in nodes.items():
            self.nodes[name] = spawn(
                "node", ["run", "--state-dir", str(self.root / name), "--proxy-port",
                         str(free_port()), "--telemetry-period", "0.5", *extra],
                self.root / f"node-{name}.log")

    def procs(self) -> list[Proc]:
        return [*(r.proc for r in self.replicas.values() if r.proc is not None),
                *self.nodes.values()]

    def wait_nodes(self, replicas: list[Replica], count: int, timeout: float) -> None:
        wait_until(lambda: all(r.nodes() == count for r in replicas), timeout,
                   f"{count} nodes on {[r.name for r in replicas]}", self.procs())

    def stop(self) -> None:
        procs = [*self.nodes.values(), *(r.proc for r in self.replicas.values() if r.proc)]
        for proc in procs:  # all at once: each drains on its own
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.stop()
        if self.haproxy is not None:
            self.haproxy.terminate()
            self.haproxy.wait(10)
        for proc in self.others:
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.log_text()[-4000:]}" for p in self.procs())
