"""Shared fixtures: the repository root on sys.path, and the real test model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once into the cache by scripts/fetch_model.sh."""
    result = subprocess.run(
        [str(ROOT / "scripts" / "fetch_model.sh")],
        capture_output=True, text=True, check=False, timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/fetch_model.sh failed:\n{result.stderr}")
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_file(), path
    return path
