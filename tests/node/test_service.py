"""`meshgate-node install-service`: the unit it writes is valid for systemd and hardened."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node_agent.service import (
    TEMPLATE,
    UNIT_NAME,
    ServiceError,
    install,
    node_command,
    render_unit,
)

SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def unit_settings(text: str) -> dict[str, list[str]]:
    """key -> every value it has in the unit (DeviceAllow= repeats)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def installed(tmp_path: Path, user: str = "meshgate") -> tuple[Path, list[str]]:
    config = tmp_path / "etc" / "node.toml"
    lines = list(
        install(
            user=user,
            config=config,
            unit_dir=tmp_path / "units",
            run=lambda cmd: pytest.fail(f"ran {cmd}"),
        )
    )
    return tmp_path / "units" / UNIT_NAME, lines


def test_written_unit_runs_this_install_as_its_own_user(tmp_path: Path) -> None:
    unit_path, lines = installed(tmp_path, user="mgnode")
    text = unit_path.read_text()
    s = unit_settings(text)
    config = tmp_path / "etc" / "node.toml"
    assert s["ExecStart"] == [f"{' '.join(node_command())} run --config {config}"]
    assert Path(node_command()[0]).exists()
    assert s["User"] == ["mgnode"]
    assert s["Group"] == ["mgnode"]
    assert s["DynamicUser"] == ["no"]
    assert s["StateDirectory"] == ["meshgate"]
    assert s["ConfigurationDirectory"] == ["meshgate"]
    assert f"MESHGATE_CONFIG={config}" in s["Environment"]
    assert any(line.startswith(f"wrote {unit_path}") for line in lines)
    # the example config was created and is a valid (all-commented) config
    assert config.exists()
    assert any(
        "would run: systemctl enable --now" in line or "ran: systemctl" in line for line in lines
    )


def test_unit_is_hardened_but_lets_the_gpu_through() -> None:
    s = unit_settings(TEMPLATE.read_text())
    assert "PrivateDevices" not in s  # it would hide /dev/nvidia*
    assert s["DevicePolicy"] == ["closed"]
    allowed = " ".join(s["DeviceAllow"])
    for device in ("char-nvidia-frontend", "char-nvidia-uvm", "/dev/nvidiactl", "char-drm"):
        assert device in allowed
    for key, value in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "read-only"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
    ]:
        assert s[key] == [value], key
    assert "User" in s
    assert "root" not in s["User"]


def test_systemd_analyze_verify_accepts_the_written_unit(tmp_path: Path) -> None:
    if not Path(SYSTEMD_ANALYZE).exists():
        pytest.skip("systemd-analyze is not installed on this machine")
    unit_path, _ = installed(tmp_path)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0 and "Failed to initialize manager" in result.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    # unknown keys and bad values are only warnings (exit 0): refuse those too
    assert "Unknown key" not in result.stderr, result.stderr
    assert "ignoring" not in result.stderr.lower(), result.stderr


def test_verify_would_catch_a_bad_unit(tmp_path: Path) -> None:
    """The check above can fail: the same verify on a broken unit complains."""
    if not Path(SYSTEMD_ANALYZE).exists():
        pytest.skip("systemd-analyze is not installed on this machine")
    bad = tmp_path / UNIT_NAME
    text = render_unit(
        TEMPLATE.read_text(),
        command=["/nonexistent/meshgate-node"],
        user="meshgate",
        config=Path("/etc/meshgate/node.toml"),
    )
    bad.write_text(text.replace("[Service]\n", "[Service]\nProtectSystm=strict\n"))
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0 or "Unknown key" in result.stderr


def test_existing_config_is_kept(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "node.toml"
    config.parent.mkdir()
    config.write_text("proxy_port = 12000\n")
    lines = list(
        install(
            config=config, unit_dir=tmp_path / "units", run=lambda cmd: pytest.fail(f"ran {cmd}")
        )
    )
    assert config.read_text() == "proxy_port = 12000\n"
    assert f"kept the existing config {config}" in lines


def test_bad_user_name_is_refused() -> None:
    with pytest.raises(ServiceError, match="bad user name"):
        render_unit("ExecStart=x\n", command=["x"], user="root; rm -rf /", config=Path("/c"))


def test_cli_dry_run_writes_nothing_and_prints_the_unit(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "node_agent.cli",
            "install-service",
            "--dry-run",
            "--user",
            "edge",
            "--config",
            str(tmp_path / "node.toml"),
            "--unit-dir",
            str(tmp_path / "units"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "units").exists()
    assert not (tmp_path / "node.toml").exists()
    assert "would write" in result.stdout
    assert "User=edge" in result.stdout
    assert "would run: systemctl enable --now meshgate-node.service" in result.stdout
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    unit_text = result.stdout.split(":\n", 1)[1].split("\nwould write an example", 1)[0]
    parser.read_string(
        "\n".join(
            line
            for line in unit_text.splitlines()
            if not line.startswith("DeviceAllow") and not line.startswith("Environment")
        )
    )
    assert parser["Service"]["StateDirectory"] == "meshgate"
