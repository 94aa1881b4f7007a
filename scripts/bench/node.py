"""What the node daemon costs when it is doing nothing but watching the box.

    .venv/bin/python scripts/bench/node.py [--samples 300] [--idle 6] [--no-model] [--json OUT]

Two measurements, each bounded (a few seconds per case, ~1 minute in all):

1. **Telemetry sampling cost**: CPU seconds (this process, user + system) and
   wall seconds per ``TelemetrySampler.sample()``, over ``--samples`` calls, for
   a host-only sampler, with the FAKE NVML (two recorded RTX 4090s; the cost of
   our NVML code path, not of a real driver), and with the real ``pynvml``
   (``[]`` on a box without a driver: the cost of finding out once).
2. **Idle daemon memory**: a real ``meshgate-node run`` subprocess (not
   connected), measured after ``--idle`` seconds of idling with the default
   2 s telemetry period: resident set (RSS) and unique set (USS) of the daemon
   process alone, and of the daemon with its runner subprocesses; plus the
   daemon's CPU seconds per idle second (its sampling loop included). Cases: no
   models; one upstream (the FAKE OpenAI server, not counted); the real
   SmolLM2 model in a llama.cpp runner (skip with ``--no-model``).

Absolute figures depend on the box; per-sample CPU and the RSS split
(daemon vs runner) are the numbers to compare.

Measured 2026-11-24 on a shared 2-vCPU VM (no GPU, no NVIDIA driver; other
jobs running), ``.venv/bin/python scripts/bench/node.py`` (300 samples, 6 s idle):

    case                        cpu ms/sample  wall ms/sample  gpus
    host only                           0.188           0.294     0
    host + fake NVML (2 GPUs)           0.291           0.499     2
    host + real pynvml                  0.198           0.386     0

    case                           daemon RSS  daemon USS  runners RSS  total RSS  cpu s/s
    no models                        92.8 MiB    59.6 MiB      0.0 MiB   92.8 MiB   0.0016
    one upstream                     93.4 MiB    60.3 MiB      0.0 MiB   93.4 MiB   0.0016
    SmolLM2 in a llama.cpp runner    94.6 MiB    60.2 MiB    232.7 MiB  327.3 MiB   0.0016

So one sample costs ~0.2 ms of CPU (~0.1 ms more for two GPUs through our NVML
code), i.e. ~0.01 % of a core at the default 2 s period; the idle daemon
(sampling loop, inventory poll, uvicorn) uses ~0.16 % of a core and ~93 MiB
RSS, and a model's memory is in its runner process, not in the daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from node_agent.nvml import NvmlSource  # noqa: E402
from node_agent.telemetry import TelemetrySampler  # noqa: E402
from tests.e2e.mesh import free_port, wait_until  # noqa: E402
from tests.node.fake_nvml import FakeNvml, load_fixture  # noqa: E402

MIB = 2**20


def sampling_cost(samples: int) -> list[dict[str, Any]]:
    cases = {
        "host only": TelemetrySampler([ROOT], None),
        "host + fake NVML (2 GPUs)": TelemetrySampler(
            [ROOT], NvmlSource(FakeNvml(load_fixture("nvml_rtx4090_x2.json")))
        ),
        "host + real pynvml": TelemetrySampler([ROOT], NvmlSource()),
    }
    rows = []
    for name, sampler in cases.items():
        sampler.sample()  # warm: imports, nvmlInit
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(samples):
            sampler.sample()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        rows.append(
            {
                "case": name,
                "samples": samples,
                "cpu_ms_per_sample": round(cpu / samples * 1000, 3),
                "wall_ms_per_sample": round(wall / samples * 1000, 3),
                "gpus": len(sampler.sample()["gpus"]),
            }
        )
    return rows


def memory(proc: psutil.Process) -> tuple[int, int]:
    info = proc.memory_full_info()
    return int(info.rss), int(getattr(info, "uss", info.rss))


def idle_daemon(name: str, extra: list[str], idle: float, tmp: Path) -> dict[str, Any]:
    port = free_port()
    log = tmp / f"{name.replace(' ', '_')}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node_agent.cli",
                "run",
                "--state-dir",
                str(tmp / name),
                "--proxy-port",
                str(port),
                "--no-connect",
                "--log-level",
                "warning",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "MESHGATE_CONFIG": ""},
        )
    try:
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200,
            120,
            f"daemon ({name})",
        )
        daemon = psutil.Process(popen.pid)
        time.sleep(1.0)  # settle after start-up
        cpu0 = sum(daemon.cpu_times()[:2])
        started = time.perf_counter()
        readings = []
        while time.perf_counter() - started < idle:
            time.sleep(0.5)
            children = daemon.children(recursive=True)
            d_rss, d_uss = memory(daemon)
            c = [memory(ch) for ch in children if ch.is_running()]
            readings.append(
                (d_rss, d_uss, sum(r for r, _ in c), sum(u for _, u in c), len(children))
            )
        cpu = sum(daemon.cpu_times()[:2]) - cpu0
        elapsed = time.perf_counter() - started
        med = [statistics.median(r[i] for r in readings) for i in range(5)]
        return {
            "case": name,
            "daemon_rss_mib": round(med[0] / MIB, 1),
            "daemon_uss_mib": round(med[1] / MIB, 1),
            "runners_rss_mib": round(med[2] / MIB, 1),
            "total_rss_mib": round((med[0] + med[2]) / MIB, 1),
            "runners": int(med[4]),
            "daemon_cpu_s_per_idle_s": round(cpu / elapsed, 4),
        }
    finally:
        popen.terminate()
        try:
            popen.wait(20)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)


def model_path() -> Path | None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "fetch_model.sh")],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode != 0:
        return None
    path = Path(result.stdout.strip().splitlines()[-1])
    return path if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--idle", type=float, default=6.0)
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    print(f"# {platform.node()}: {psutil.cpu_count()} CPUs, Python {platform.python_version()}")
    cost = sampling_cost(args.samples)
    print("\ntelemetry sampling cost (this process)")
    print(f"{'case':30} {'cpu ms/sample':>14} {'wall ms/sample':>15} {'gpus':>5}")
    for r in cost:
        print(
            f"{r['case']:30} {r['cpu_ms_per_sample']:>14} {r['wall_ms_per_sample']:>15} "
            f"{r['gpus']:>5}"
        )

    rows = []
    with tempfile.TemporaryDirectory(prefix="mg-bench-node-") as tmp_name:
        tmp = Path(tmp_name)
        rows.append(idle_daemon("no models", [], args.idle, tmp))
        fake_port = free_port()
        fake = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "node" / "fake_openai_server.py"),
                "--port",
                str(fake_port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            rows.append(
                idle_daemon(
                    "one upstream",
                    ["--upstream", f"fake=http://127.0.0.1:{fake_port}/v1"],
                    args.idle,
                    tmp,
                )
            )
        finally:
            fake.terminate()
            fake.wait(10)
        path = None if args.no_model else model_path()
        if path is not None:
            rows.append(
                idle_daemon(
                    "SmolLM2 in a llama.cpp runner", ["--model", f"smol={path}"], args.idle, tmp
                )
            )
    print(f"\nidle daemon, {args.idle:g} s after start-up (medians)")
    print(
        f"{'case':32} {'daemon RSS':>11} {'daemon USS':>11} {'runners RSS':>12} "
        f"{'total RSS':>10} {'cpu s/s':>8}"
    )
    for r in rows:
        print(
            f"{r['case']:32} {r['daemon_rss_mib']:>7} MiB {r['daemon_uss_mib']:>7} MiB "
            f"{r['runners_rss_mib']:>8} MiB {r['total_rss_mib']:>6} MiB "
            f"{r['daemon_cpu_s_per_idle_s']:>8}"
        )
    if args.json:
        args.json.write_text(json.dumps({"sampling": cost, "idle": rows}, indent=2))


if __name__ == "__main__":
    main()
