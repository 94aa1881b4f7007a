"""Shared fixtures: the repository root on sys.path, the real test model, and the logging
set-up restored after a test that changes it."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.cluster.engines import PostgresServer

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


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL for one test module (tests/cluster/engines.py; each test takes a
    database of its own with `fresh_database`); skipped with the reason where none runs."""
    from tests.cluster.engines import PostgresServer

    server = PostgresServer()
    try:
        yield server
    finally:
        server.remove()


#: Loggers whose levels `setup_logging` sets (meshgate/logs.py); put back to NOTSET after.
_TUNED_LOGGERS = ("httpx", "httpcore", "uvicorn.access", "websockets.server", "websockets.client")


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """The root logger's handlers and level, the tuned loggers' levels and the access-log
    switch, as they were before the test (which may call setup_logging and friends)."""
    from meshgate.logs import set_access_log

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        set_access_log(True)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        for name in _TUNED_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
