"""Startup errors: one line naming the fix and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgate.httpserver import NODE_LIMITS, from_env
from meshgate.startup import StartupError, check_port, model_dir_warnings


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_taken_port_is_named_with_the_option_that_moves_it(held_port: int) -> None:
    with pytest.raises(StartupError) as caught:
        check_port("127.0.0.1", held_port, what="local proxy", option="--proxy-port")
    assert f"127.0.0.1:{held_port} is taken" in str(caught.value)
    assert "--proxy-port" in str(caught.value)


def test_a_free_or_any_port_passes() -> None:
    check_port("127.0.0.1", 0, what="API", option="--api-port")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    check_port("127.0.0.1", free, what="API", option="--api-port")


def test_an_address_not_of_this_machine_is_named() -> None:
    with pytest.raises(StartupError, match="not an address of this machine"):
        check_port("192.0.2.1", 8470, what="API", option="--api-port")  # TEST-NET-1


def test_missing_and_empty_model_dirs_are_warnings(tmp_path: Path) -> None:
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    (full / "sub").mkdir(parents=True)
    (full / "sub" / "m.gguf").write_bytes(b"GGUF")
    warnings = model_dir_warnings([tmp_path / "nope", empty, full])
    assert len(warnings) == 2
    assert "does not exist" in warnings[0]
    assert "holds no .gguf" in warnings[1]


def _cli(module: str, *args: str, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", f"from {module} import app; app()", *args],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **(env or {})})


def test_the_node_names_a_missing_model_file_in_one_line(tmp_path: Path) -> None:
    run = _cli("node_agent.cli", "run", "--state-dir", str(tmp_path), "--no-connect",
               "--proxy-port", "0", "--model", "x=/missing.gguf")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "error: --model x=/missing.gguf: no such file /missing.gguf: fix the path "
        "(--model NAME=/path/to/model.gguf) or leave the option out")
    assert "Traceback" not in run.stderr


def test_the_node_names_its_taken_port(tmp_path: Path, held_port: int) -> None:
    run = _cli("node_agent.cli", "run", "--state-dir", str(tmp_path), "--no-connect",
               "--proxy-port", str(held_port))
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert f"error: local proxy port 127.0.0.1:{held_port} is taken" in run.stderr


def test_the_node_refuses_a_bad_http_knob_before_its_port(tmp_path: Path, held_port: int
                                                          ) -> None:
    run = _cli("node_agent.cli", "run", "--state-dir", str(tmp_path), "--no-connect",
               "--proxy-port", str(held_port), env={"MESHGATE_HTTP_HEAD_TIMEOUT_S": "0"})
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "error: MESHGATE_HTTP_HEAD_TIMEOUT_S='0': must be a number of seconds above 0")


def test_the_coordinator_names_its_taken_port(tmp_path: Path, held_port: int) -> None:
    state = str(tmp_path / "coordinator")
    assert _cli("coordinator.cli", "init", "--state-dir", state).returncode == 0
    run = _cli("coordinator.cli", "serve", "--state-dir", state, "--api-host", "127.0.0.1",
               "--api-port", "0", "--tunnel-host", "127.0.0.1", "--tunnel-port", str(held_port))
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"error: tunnel endpoint port 127.0.0.1:{held_port} is taken")


@pytest.mark.parametrize(("name", "says"), [
    ("MESHGATE_LEDGER_LINGER_MS", "must be a number of ms from 0 to 60000"),
    ("MESHGATE_COORDINATOR_LAG_MS", "must be a number of ms"),
    ("MESHGATE_HTTP_BODY_TIMEOUT_S", "must be a number of seconds above 0"),
    ("MESHGATE_HTTP_MAX_CONNECTIONS", "must be a whole number of connections above 0"),
])
def test_the_coordinator_refuses_a_bad_environment_knob_before_its_ports(
        tmp_path: Path, held_port: int, name: str, says: str) -> None:
    """Each MESHGATE_* knob the server reads at start is refused alike when bad: one line
    naming the variable and the value, exit 1, before anything else is checked (the port
    held here would be the error otherwise)."""
    state = str(tmp_path / "coordinator")
    assert _cli("coordinator.cli", "init", "--state-dir", state).returncode == 0
    run = _cli("coordinator.cli", "serve", "--state-dir", state, "--api-host", "127.0.0.1",
               "--api-port", str(held_port), "--tunnel-port", "0", env={name: "soon"})
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"error: {name}='soon': {says}"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon", "1e999"])
def test_a_bad_http_timeout_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch,
                                                 value: str) -> None:
    monkeypatch.setenv("MESHGATE_HTTP_WRITE_TIMEOUT_S", value)
    with pytest.raises(StartupError, match=r"^MESHGATE_HTTP_WRITE_TIMEOUT_S="):
        from_env(NODE_LIMITS)


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "\u00b2", "many"])
def test_a_bad_connection_cap_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch,
                                                   value: str) -> None:
    monkeypatch.setenv("MESHGATE_HTTP_MAX_CONNECTIONS", value)
    with pytest.raises(StartupError, match=r"^MESHGATE_HTTP_MAX_CONNECTIONS="):
        from_env(NODE_LIMITS)


def test_good_http_knobs_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHGATE_HTTP_HEAD_TIMEOUT_S", " 1.5 ")
    monkeypatch.setenv("MESHGATE_HTTP_MAX_CONNECTIONS", "100")
    monkeypatch.setenv("MESHGATE_HTTP_BODY_TIMEOUT_S", "")
    limits = from_env(NODE_LIMITS)
    assert (limits.head_timeout_s, limits.max_connections) == (1.5, 100)
    assert limits.body_timeout_s == NODE_LIMITS.body_timeout_s
