"""What an idle node daemon does not load (issue 10's idle RSS): the tunnel and its crypto
until it links to a coordinator, the runners' HTTP client until a runtime is used, h11
unless MESHGATE_HTTP_PARSER=h11. Checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

DEFERRED = ("tunnel", "websockets", "cryptography", "aiohttp", "httpx", "h11")


def test_the_daemon_modules_leave_the_heavy_ones_for_later() -> None:
    code = (
        "import sys, node_agent.cli, node_agent.daemon, node_agent.proxy\n"
        f"print(' '.join(m for m in {DEFERRED!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.split() == []
