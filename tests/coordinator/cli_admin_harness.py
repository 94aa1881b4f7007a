"""Shared pieces of the `meshgate-coordinator` admin command tests: a state dir as `init`
leaves it, the typer app run in process or the real console module in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner, Result

from coordinator.cli import app
from coordinator.state import StateDir
from coordinator.store import Store

DID = "did:key:z6MkNODE"
TUNNEL_URL = "ws://10.0.0.5:8471"
REPO = Path(__file__).resolve().parents[2]


def make_state_dir(tmp_path: Path) -> Path:
    """A coordinator's state dir, as `init` (or a first `serve`) leaves it."""
    path = tmp_path / "coordinator"
    done = CliRunner().invoke(app, ["init", "--state-dir", str(path)])
    assert done.exit_code == 0, done.stderr
    return path


def run(state_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(app, [*args, "--state-dir", str(state_dir)])


def run_real(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args, "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
    )


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def open_store(state_dir: Path) -> Store:
    return Store(StateDir(state_dir).db_url)
