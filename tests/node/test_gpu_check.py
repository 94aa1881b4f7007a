"""scripts/gpu_check.py (run by hand on a lent GPU) checked here on the fake NVML."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> tuple[int, dict[str, object]]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )
    return done.returncode, json.loads(done.stdout)


def test_the_script_sees_the_fake_counter_move_and_the_meter_add_up() -> None:
    code, result = run("--fake", "--seconds", "0.6", "--interval", "0.1")
    assert code == 0, result
    [idle] = result["energy_idle"]  # type: ignore[misc]
    assert idle["counter_moved"]
    assert abs(idle["mean_power_w_from_counter"] - 71.234) < 1.0  # the fake H100's draw
    meter = result["meter"]
    assert isinstance(meter, dict)
    assert meter["sums_to_measured"]
    assert 0 < meter["request_joules"] < meter["measured_j"]
    assert result["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"  # type: ignore[index]


def test_without_nvml_it_says_why_and_fails() -> None:
    code, result = run("--seconds", "0.2")
    if result["gpus"]:  # a box with a real GPU: nothing to check here
        return
    assert code == 1
    assert result["nvml_unavailable"]
    assert result["ok"] is False
