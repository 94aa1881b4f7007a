"""The coordinator's state directory and `init`, as the admin commands find and keep it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.state import StateDir
from tests.coordinator.cli_admin_harness import (
    DID,
    REPO,
    TUNNEL_URL,
    make_state_dir,
    run,
)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return make_state_dir(tmp_path)


# ----------------------------------------------------------------------------- state dir


def test_the_state_dir_is_private_and_the_static_key_is_0600_and_stable(state_dir: Path) -> None:
    state = StateDir(state_dir)
    first = state.static_public()
    assert StateDir(state_dir).static_public() == first
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    key_file = state_dir / "coordinator_static.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32


def test_a_damaged_static_key_is_reported_not_replaced(state_dir: Path) -> None:
    (state_dir / "coordinator_static.key").write_bytes(b"short")
    done = run(state_dir, "token", "create", "--tunnel-url", TUNNEL_URL)
    assert done.exit_code == 2
    assert "not a 32-byte X25519 key" in done.stderr
    assert (state_dir / "coordinator_static.key").read_bytes() == b"short"


def test_the_state_dir_comes_from_the_environment_when_not_given(tmp_path: Path) -> None:
    env = {**os.environ, "MESHGATE_COORDINATOR_STATE": str(tmp_path / "from-env")}
    for command in (["init"], ["key", "create", "--name", "x"]):
        done = subprocess.run(
            [sys.executable, "-m", "coordinator.cli", *command],
            capture_output=True, text=True, timeout=60, check=False, env=env, cwd=REPO,
        )
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "from-env" / "coordinator.db").exists()


@pytest.mark.parametrize("command", [
    ["key", "create", "--name", "x"], ["key", "list"], ["nodes"], ["usage"],
    ["token", "create", "--tunnel-url", TUNNEL_URL], ["node", "revoke", DID],
])
def test_a_mistyped_state_dir_is_an_error_and_creates_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    wrong = tmp_path / "coordinatr"
    done = run(wrong, *command)
    assert done.exit_code == 2
    assert f"no coordinator database in {wrong}" in done.stderr
    assert done.stdout == ""
    assert not wrong.exists()


def test_init_writes_a_private_admin_key_once(state_dir: Path) -> None:
    key_file = state_dir / "admin.key"
    first = key_file.read_text()
    assert first.startswith("mga_")
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert run(state_dir, "init").exit_code == 0
    assert key_file.read_text() == first  # a live admin key exists: nothing new
    listed = run(state_dir, "admin-key", "list").stdout
    assert "first" in listed
    assert first.strip().split("_", 2)[2] not in listed  # the whole secret (it may hold "_")


def test_the_database_url_can_point_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHGATE_COORDINATOR_DB_URL", f"sqlite:///{tmp_path / 'other.db'}")
    assert StateDir(tmp_path / "state").db_url.endswith("other.db")
    assert StateDir(tmp_path / "state", db_url="sqlite:///x.db").db_url == "sqlite:///x.db"
