"""The dependency rule, tested: tunnel imports nothing of ours, and only the shell's
socket modules (ws.py, wire.py, and wsframes.py, the websocket frames they read fast)
import websockets."""

from __future__ import annotations

import ast
from pathlib import Path

TUNNEL = Path(__file__).resolve().parents[2] / "tunnel"
OURS = ("node_agent", "coordinator", "meshgate")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_tunnel_imports_nothing_from_node_agent_coordinator_or_meshgate() -> None:
    modules = sorted(TUNNEL.glob("*.py"))
    assert len(modules) > 10
    for path in modules:
        bad = {n for n in _imports(path) if n.split(".")[0] in OURS}
        assert not bad, f"{path.name} imports {bad}"


def test_only_the_socket_modules_import_websockets() -> None:
    users = {
        p.name
        for p in TUNNEL.glob("*.py")
        if any(n.split(".")[0] == "websockets" for n in _imports(p))
    }
    assert users == {"ws.py", "wire.py", "wsframes.py"}


def test_the_sans_io_core_imports_no_asyncio() -> None:
    core = [
        "noise",
        "identity",
        "handshake",
        "frames",
        "compress",
        "session",
        "ratelimit",
        "backoff",
        "constants",
    ]
    for name in core:
        assert "asyncio" not in _imports(TUNNEL / f"{name}.py"), name
