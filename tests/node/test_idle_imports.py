"""What an idle node daemon does not load (issue 10's idle RSS): the tunnel and its crypto
until it links to a coordinator, the runners' HTTP client until a runtime is used, h11
unless MESHGATE_HTTP_PARSER=h11, and request validation (pydantic, pydantic-core and
meshgate.schema's models, ~16 MiB together) until the first request is parsed, linked or
not. Checked in a fresh interpreter; the last test runs the real `meshgate-node run`."""

from __future__ import annotations

import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

DEFERRED = ("tunnel", "websockets", "cryptography", "aiohttp", "httpx", "h11")
VALIDATION = ("pydantic", "pydantic_core", "meshgate.schema")


def loaded(imports: str, names: tuple[str, ...]) -> list[str]:
    code = f"import sys, {imports}\nprint(' '.join(m for m in {names!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.split()


def test_the_daemon_modules_leave_the_heavy_ones_for_later() -> None:
    assert loaded("node_agent.cli, node_agent.daemon, node_agent.proxy",
                  DEFERRED + VALIDATION) == []


def test_a_linked_node_loads_no_request_validation_either() -> None:
    # the link's modules (tunnel, token frames, the journal upload) come in when it connects
    assert loaded("node_agent.daemon, node_agent.link, meshgate.token_frames", VALIDATION) == []


def test_request_validation_loads_on_the_first_parse() -> None:
    code = ("import meshgate.openai, meshgate.bounds\n"
            "meshgate.bounds.load_json(b'{}')\n"
            "meshgate.openai.parse(b'{\"model\": \"m\", \"input\": \"x\"}', 'embeddings')")
    assert loaded(f"meshgate.openai\n{code}", VALIDATION) == list(VALIDATION)


def test_a_running_daemon_has_not_loaded_them(tmp_path: Path) -> None:
    """The real CLI (typer parses the options: typer 0.29 would load pydantic for that,
    pyproject pins below it) starts the real daemon; once /healthz answers, a thread in
    the daemon's process says what it has loaded. In a venv still holding typer 0.29 (from
    before the pin; `pip install -e '.[test]'` fixes it) pydantic itself is let pass."""
    stale_typer = tuple(int(x) for x in version("typer").split(".")[:2]) >= (0, 29)
    allowed = {"pydantic", "pydantic_core"} if stale_typer else set()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"""
import os, sys, threading, time, urllib.request
def report() -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen("http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.05)
    names = {DEFERRED + VALIDATION!r}
    print("loaded:", *(m for m in names if m in sys.modules), flush=True)
    os._exit(0)
threading.Thread(target=report, daemon=True).start()
from node_agent.cli import app
app(["run", "--state-dir", {str(tmp_path)!r}, "--proxy-port", "{port}", "--no-connect",
     "--log-level", "warning"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=90, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("loaded:")), None)
    assert line is not None, out.stderr[-2000:]
    assert [m for m in line.split()[1:] if m not in allowed] == []
