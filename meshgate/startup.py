"""Startup checks both daemons run before they listen: one clear line per problem.

A daemon that cannot start says why in one line naming the fix and exits
non-zero (the CLIs catch :class:`StartupError`), instead of a traceback from
deep inside uvicorn, websockets or llama.cpp: a port another process holds, a
model file that is not there. What is odd but not fatal (a model directory
that is missing or holds no ``.gguf``) is a warning and the daemon starts.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

__all__ = ["StartupError", "check_port", "model_dir_warnings"]


class StartupError(Exception):
    """A daemon cannot start; the message says what to change."""


def check_port(host: str, port: int, *, what: str, option: str) -> None:
    """Raise :class:`StartupError` unless `host`:`port` can be listened on now (port 0:
    any free one, always fine). Binds and closes a socket the way uvicorn and
    websockets will (SO_REUSEADDR), so a port in TIME_WAIT is not "taken"."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"{what} address {host!r} does not resolve ({exc.strerror}): "
                           f"fix the host given with {option.replace('port', 'host')}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise StartupError(_why(exc, host, port, what, option)) from None


def _why(exc: OSError, host: str, port: int, what: str, option: str) -> str:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (f"{what} port {where} is taken by another process (another meshgate "
                f"already running? `ss -ltnp 'sport = :{port}'` names it): stop it, or pass "
                f"{option} with a free port")
    if exc.errno == errno.EACCES:
        return (f"{what} port {port} needs privileges this user lacks: pass {option} with a "
                "port of 1024 or more")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{what} address {host} is not an address of this machine: pass "
                f"{option.replace('port', 'host')} with one of its addresses (or 0.0.0.0)")
    return f"cannot listen on {where} for the {what}: {exc.strerror or exc}"


def model_dir_warnings(model_dirs: list[Path]) -> list[str]:
    """A line for each model directory that is missing or holds no ``.gguf`` file."""
    out = []
    for d in model_dirs:
        if not d.is_dir():
            out.append(f"--model-dir {d} does not exist (or is not a directory): this node "
                       "serves no model from it; create it or fix the path")
        elif next(d.rglob("*.gguf"), None) is None:
            out.append(f"--model-dir {d} holds no .gguf file yet: put models there (they are "
                       "picked up while running) or fix the path")
    return out
