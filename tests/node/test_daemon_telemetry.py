"""A real `meshgate-node run` subprocess: telemetry, inventory, /metrics and `status`.

The runtime is an upstream (the fake OpenAI server, a real HTTP process), the
GPUs come from the fake NVML (two recorded RTX 4090s, power unreadable on GPU
1) named by MESHGATE_NVML_MODULE, and the options come from a config file,
the environment and the command line together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.mesh import Proc, free_port, wait_until
from tests.node.fake_nvml import load_fixture

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FAKE_SERVER = ROOT / "tests" / "node" / "fake_openai_server.py"
GPUS = load_fixture("nvml_rtx4090_x2.json")["gpus"]


@dataclass
class Node:
    proc: Proc
    port: int
    model_dir: Path
    config: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    out = log.open("wb")
    popen = subprocess.Popen(
        argv,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    return Proc(popen, log)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("daemon")
    upstream_port, proxy_port = free_port(), free_port()
    fake = spawn(
        [sys.executable, str(FAKE_SERVER), "--port", str(upstream_port), "--name", "fake"],
        tmp / "fake.log",
    )
    model_dir = tmp / "models"
    model_dir.mkdir()
    (model_dir / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)
    config = tmp / "node.toml"
    config.write_text(
        f"proxy_port = {proxy_port}\n"
        f'upstreams = ["fake=http://127.0.0.1:{upstream_port}/v1"]\n'
        f'model_dirs = ["{model_dir}"]\n'
        "telemetry_period = 5\n"
        "inventory_period = 0.3\n"
    )
    env = {
        "MESHGATE_CONFIG": str(config),
        "MESHGATE_TELEMETRY_PERIOD": "0.3",  # env beats the file's 5 s
        "MESHGATE_NVML_MODULE": "tests.node.fake_nvml:rtx4090_x2_power_unsupported",
    }
    proc = spawn(
        [
            sys.executable,
            "-m",
            "node_agent.cli",
            "run",
            "--state-dir",
            str(tmp / "state"),
            "--log-level",
            "info",
        ],
        tmp / "node.log",
        env,
    )
    n = Node(proc, proxy_port, model_dir, config)
    try:
        wait_until(lambda: n.get("/healthz").status_code == 200, 60, "node proxy", [proc, fake])
        yield n
    finally:
        proc.stop()
        fake.stop()


def telemetry(node: Node) -> dict[str, Any]:
    reply = node.get("/meshgate/telemetry")
    assert reply.status_code == 200, reply.text
    data: dict[str, Any] = reply.json()
    return data


def test_host_section_describes_this_box(node: Node) -> None:
    host = telemetry(node)["host"]
    assert host["cpu_count"] == psutil.cpu_count()
    assert len(host["cpu_util_pct_per_core"]) == psutil.cpu_count()
    assert 0.0 <= host["cpu_util_pct"] <= 100.0
    assert len(host["load_avg"]) == 3
    assert host["mem_total_bytes"] == psutil.virtual_memory().total
    assert 0 < host["mem_available_bytes"] <= host["mem_total_bytes"]
    assert host["swap_total_bytes"] >= host["swap_used_bytes"] >= 0
    free = host["disk_free_bytes"][str(node.model_dir)]
    assert isinstance(free, int)
    assert free > 0


def test_gpus_come_from_nvml_and_an_unreadable_field_is_none(node: Node) -> None:
    gpus = telemetry(node)["gpus"]
    assert [g["uuid"] for g in gpus] == [g["uuid"] for g in GPUS]
    assert gpus[0]["vram_used_bytes"] == GPUS[0]["memory"]["used"]
    assert gpus[0]["power_draw_w"] == GPUS[0]["power_usage_mw"] / 1000
    assert gpus[1]["power_draw_w"] is None
    assert gpus[1]["unavailable"] == ["power_mw"]
    assert gpus[1]["vram_total_bytes"] == GPUS[1]["memory"]["total"]  # the rest still read
    assert "cannot read power_mw" in node.proc.log_text()
    nvml = telemetry(node)["nvml"]
    assert nvml == {"driver_version": "550.120", "unavailable_reason": None}


def test_sample_is_refreshed_on_the_period_from_the_environment(node: Node) -> None:
    first = telemetry(node)["ts"]
    wait_until(lambda: telemetry(node)["ts"] > first, 10, "a newer sample", [node.proc])


def test_requests_show_in_runtime_telemetry_and_metrics(node: Node) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{node.url}/v1/chat/completions", json=body).status_code == 200
    with httpx.stream(
        "POST", f"{node.url}/v1/chat/completions", json={**body, "stream": True}
    ) as reply:
        assert reply.status_code == 200
        events = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    missing = httpx.post(f"{node.url}/v1/chat/completions", json={**body, "model": "nope"})
    assert missing.status_code == 404

    def served() -> bool:
        return bool(telemetry(node)["runtime"]["fake"]["served"] == 2)

    wait_until(served, 10, "served == 2 in telemetry", [node.proc])
    fake = telemetry(node)["runtime"]["fake"]
    assert fake["kind"] == "upstream"
    assert fake["loaded"] is True
    assert fake["in_flight"] == 0
    assert fake["queue"] == 0
    assert fake["crashes"] == 0
    assert fake["decode_tps"] is not None
    assert fake["decode_tps"] > 0

    samples = metric_samples(node)
    assert (
        samples[
            (
                "meshgate_node_requests_total",
                (("model", "fake"), ("status", "200"), ("via", "proxy")),
            )
        ]
        == 2
    )
    assert (
        samples[
            (
                "meshgate_node_requests_total",
                (("model", "_unknown"), ("status", "404"), ("via", "proxy")),
            )
        ]
        == 1
    )
    assert (
        samples[
            ("meshgate_node_request_duration_seconds_count", (("model", "fake"), ("via", "proxy")))
        ]
        == 2
    )
    assert samples[("meshgate_node_time_to_first_token_seconds_count", (("model", "fake"),))] == 1
    assert samples[("meshgate_node_tokens_total", (("kind", "prompt"), ("model", "fake")))] == 14
    assert samples[("meshgate_node_tokens_total", (("kind", "completion"), ("model", "fake")))] == 6
    assert samples[("meshgate_node_in_flight", (("model", "fake"),))] == 0
    assert samples[("meshgate_node_runner_restarts_total", (("model", "fake"),))] == 0
    gpu0 = (("gpu", "0"), ("uuid", GPUS[0]["uuid"]))
    assert samples[("meshgate_node_gpu_vram_used_bytes", gpu0)] == GPUS[0]["memory"]["used"]
    gpu1 = (("gpu", "1"), ("uuid", GPUS[1]["uuid"]))
    assert ("meshgate_node_gpu_power_watts", gpu1) not in samples  # unreadable: no series
    assert ("meshgate_node_cpu_utilisation_percent", ()) in samples


def metric_samples(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = node.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }


def test_broken_gguf_is_listed_unusable_and_not_served(node: Node) -> None:
    inventory = node.get("/meshgate/inventory").json()
    broken = [f for f in inventory["files"] if f["name"] == "broken"]
    assert len(broken) == 1
    assert broken[0]["usable"] is False
    assert broken[0]["reason"]
    assert [m["name"] for m in inventory["models"]] == ["fake"]
    assert node.get("/v1/models").json()["data"][0]["id"] == "fake"


def test_a_file_added_while_running_joins_the_inventory(node: Node) -> None:
    (node.model_dir / "late.gguf").write_bytes(b"not a gguf at all")

    def listed() -> bool:
        files = node.get("/meshgate/inventory").json()["files"]
        return any(f["name"] == "late" and f["usable"] is False for f in files)

    wait_until(listed, 15, "late.gguf in the inventory", [node.proc])
    (node.model_dir / "late.gguf").unlink()
    wait_until(lambda: not listed(), 15, "late.gguf gone from the inventory", [node.proc])


def status_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node_agent.cli", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_status_prints_a_table_from_the_running_daemon(node: Node) -> None:
    result = status_cli(env={"MESHGATE_CONFIG": str(node.config)})  # port from the config
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "HOST" in out
    assert f"{psutil.cpu_count()} cores" in out
    assert "NVIDIA GeForce RTX 4090" in out
    assert "power_mw" in out  # GPU 1's unreadable field is named
    lines = out.splitlines()
    header = next(line for line in lines if line.strip().startswith("NAME") and "KIND" in line)
    row = next(line for line in lines if line.strip().startswith("fake"))
    assert "GEN TOK/S" in header
    assert "upstream" in row


def test_status_json_is_the_telemetry(node: Node) -> None:
    result = status_cli("--json", "--url", node.url)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) >= {"host", "gpus", "runtime", "ts"}
    assert "fake" in data["runtime"]


def test_status_says_so_when_the_daemon_is_not_running() -> None:
    result = status_cli("--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "not running" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_gguf_added_while_running_is_served_on_demand_and_forgotten_when_removed(
    node: Node, model_path: Path
) -> None:
    link = node.model_dir / "late-smol.gguf"
    link.symlink_to(model_path)
    wait_until(
        lambda: "late-smol" in [m["id"] for m in node.get("/v1/models").json()["data"]],
        15,
        "late-smol served",
        [node.proc],
    )
    [entry] = [
        m for m in node.get("/meshgate/inventory").json()["models"] if m["name"] == "late-smol"
    ]
    assert entry["loaded"] is False  # known, loaded on its first request
    assert entry["source"] == "gguf"
    reply = httpx.post(
        node.url + "/v1/chat/completions",
        json={
            "model": "late-smol",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
        },
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] > 0

    link.unlink()
    wait_until(
        lambda: "late-smol" not in [m["id"] for m in node.get("/v1/models").json()["data"]],
        15,
        "late-smol forgotten",
        [node.proc],
    )
    gone = httpx.post(
        node.url + "/v1/chat/completions",
        json={"model": "late-smol", "messages": [{"role": "user", "content": "Hi"}]},
        timeout=30,
    )
    assert gone.status_code == 404
