"""systemd/meshgate-coordinator.service: valid for systemd, hardened, and it runs `serve`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.node.test_service import SYSTEMD_ANALYZE, unit_settings

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "meshgate-coordinator.service"


def test_unit_serves_from_its_own_state_dir_as_its_own_user() -> None:
    s = unit_settings(UNIT.read_text())
    (exec_start,) = s["ExecStart"]
    argv = exec_start.split()
    assert argv[0].endswith("/meshgate-coordinator")
    assert argv[1] == "serve"
    assert argv[argv.index("--state-dir") + 1] == "/var/lib/meshgate/coordinator"
    assert s["StateDirectory"] == ["meshgate/coordinator"]
    assert s["User"] == ["meshgate"]
    assert s["DynamicUser"] == ["no"]
    assert s["LimitNOFILE"] == ["65536"]
    for key in ("NoNewPrivileges", "PrivateDevices", "PrivateTmp", "MemoryDenyWriteExecute"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    assert s["CapabilityBoundingSet"] == [""]


def test_the_state_dir_option_is_the_one_serve_takes() -> None:
    """The unit's flags exist: `serve --help` names them (a renamed flag fails here)."""
    result = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "serve", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--state-dir" in result.stdout


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    if not Path(SYSTEMD_ANALYZE).exists():
        pytest.skip("systemd-analyze is not installed on this machine")
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    if result.returncode != 0 and "Failed to initialize manager" in result.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()}")
    return result


def runnable_copy(tmp_path: Path, text: str) -> Path:
    """The unit with ExecStart pointing at a binary that exists here (verify checks it)."""
    unit = tmp_path / UNIT.name
    true = shutil.which("true") or "/bin/true"
    unit.write_text(text.replace("/usr/local/bin/meshgate-coordinator", true))
    return unit


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    result = verify(runnable_copy(tmp_path, UNIT.read_text()))
    assert result.returncode == 0, result.stderr
    assert "Unknown key" not in result.stderr, result.stderr
    assert "ignoring" not in result.stderr.lower(), result.stderr


def test_verify_would_catch_a_bad_unit(tmp_path: Path) -> None:
    text = UNIT.read_text().replace("[Service]\n", "[Service]\nProtectSystm=strict\n")
    result = verify(runnable_copy(tmp_path, text))
    assert result.returncode != 0 or "Unknown key" in result.stderr
