"""Where the running node daemon listens, for `meshgate-node status` and `swap`.

The daemon writes ``daemon.json`` (its local proxy URL and pid) into its state
dir once it listens, and removes it when it stops. The CLI finds the daemon of
a state dir (``--state-dir``, else the config's) from it, so a daemon started
with ``--proxy-port 12000`` is found without repeating the port; a file left
by a daemon that died (its pid gone) is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["DAEMON_FILE", "announce", "forget", "local_url_of"]

DAEMON_FILE = "daemon.json"


def _url(host: str, port: int) -> str:
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def announce(state_dir: Path, server: Any, host: str) -> None:
    """Once `server` (uvicorn) listens, write its URL and our pid to the state dir."""
    while not server.started:
        if server.should_exit:
            return
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    path = state_dir / DAEMON_FILE
    tmp = path.with_name(DAEMON_FILE + ".tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps({"url": _url(host, port), "pid": os.getpid()}))
        tmp.replace(path)


def forget(state_dir: Path) -> None:
    with contextlib.suppress(OSError):
        data = json.loads((state_dir / DAEMON_FILE).read_text())
        if data.get("pid") == os.getpid():
            (state_dir / DAEMON_FILE).unlink()


def local_url_of(state_dir: Path) -> str | None:
    """The local proxy URL of the daemon running with `state_dir`, if one is."""
    try:
        data = json.loads((state_dir / DAEMON_FILE).read_text())
        pid, url = int(data["pid"]), str(data["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # left by a daemon that died
    except PermissionError:
        pass  # alive, another user's (the service's)
    return url
