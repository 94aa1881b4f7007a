"""Time stamps of one request's way through each process, for scripts/bench/timeline.py
(imported at start by ``site`` when this folder is on PYTHONPATH and MESHGATE_TIMELINE_DIR
is set; nothing happens without the variable: the folder is a bench tool's only).

Wraps a few functions of the coordinator, the node, the tunnel and the upstream (uvicorn)
as their modules are imported; each call appends ``(label, time.monotonic_ns())`` to a
list in memory (the clock is system-wide: stamps of different processes compare).
SIGUSR1 empties the list; SIGUSR2 writes it to ``$MESHGATE_TIMELINE_DIR/PID.json`` with
the process's role (coordinator, node, upstream), read from the modules it imported.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType, ModuleType
from typing import Any

_folder = os.environ.get("MESHGATE_TIMELINE_DIR")
_stamps: list[tuple[str, int]] = []
_clock = time.monotonic_ns


def _after(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        _stamps.append((label, _clock()))
        return result
    return wrapper


def _before(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _stamps.append((label, _clock()))
        return fn(*args, **kwargs)
    return wrapper


def _async_before(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        _stamps.append((label, _clock()))
        return await fn(*args, **kwargs)
    return wrapper


def _async_around(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        _stamps.append((label + "<", _clock()))
        try:
            return await fn(*args, **kwargs)
        finally:
            _stamps.append((label + ">", _clock()))
    return wrapper


def _around(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _stamps.append((label + "<", _clock()))
        try:
            return fn(*args, **kwargs)
        finally:
            _stamps.append((label + ">", _clock()))
    return wrapper


def _patch(owner: Any, name: str, wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]],
           label: str) -> None:
    setattr(owner, name, wrap(label, getattr(owner, name)))


def _http_protocols(m: ModuleType) -> None:
    _patch(m.GuardedHttpToolsProtocol, "data_received", _before, "http.read")
    if os.environ.get("MESHGATE_TIMELINE_FINE"):
        _patch(m.GuardedHttpToolsProtocol, "_start_asgi_task", _around, "start_task")
        _patch(m.GuardedHttpToolsProtocol, "on_message_begin", _around, "msg_begin")
        _patch(m.CorkedTransport, "flush", _around, "flush")
        _patch(m.Guards, "on_response_complete", _around, "resp_complete")


def _http_hot(m: ModuleType) -> None:
    _patch(m.HotExchange, "respond", _async_around, "respond")


def _api(m: ModuleType) -> None:
    _patch(m, "parse", _after, "parsed")
    _patch(m, "_handle", _async_before, "handle")
    _patch(m, "receive_body", _async_around, "body")
    for name in ("plan", "from_cache"):
        _patch(m, name, _async_around, name)
    for name in ("for_key", "deadline_of"):
        _patch(m, name, _around, name)
    _patch(m, "_whole", _async_around, "whole")
    _patch(m, "JsonAnswer", _around, "JsonAnswer")


def _hot_routes(m: ModuleType) -> None:
    _patch(m.CoordinatorApp, "_serve", _async_before, "serve_hot")
    if os.environ.get("MESHGATE_TIMELINE_FINE"):
        _patch(m, "_whole", _around, "hot_whole")
        _patch(m, "access_line", _around, "access_line")


def _connection(m: ModuleType) -> None:
    _patch(m.Connection, "receive", _around, "core.receive")
    _patch(m.Connection, "receive_lone", _around, "core.receive_lone")
    _patch(m.Connection, "data_to_send", _around, "core.data_to_send")


def _dispatch(m: ModuleType) -> None:
    _patch(m.Dispatcher, "start", _async_before, "dispatch")
    _patch(m, "schedule", _around, "schedule")
    _patch(m.Dispatcher, "_try_node", _async_before, "try_node")
    _patch(m.Dispatcher, "_committed", _around, "committed")


def _api_context(m: ModuleType) -> None:
    _patch(m.ApiContext, "commit_now", _around, "ledger")
    if os.environ.get("MESHGATE_TIMELINE_FINE"):
        _patch(m, "fit_row", _around, "fit_row")
        _patch(m.ApiContext, "authenticate_header", _async_around, "auth")


def _wire(m: ModuleType) -> None:
    _patch(m.WsConnection, "data_received", _before, "ws.read")
    _patch(m.WsConnection, "send_message", _after, "ws.write")


def _link_writer(m: ModuleType) -> None:
    _patch(m.Writer, "_write_round", _before, "write_round")
    _patch(m.Writer, "kick", _before, "kick")


def _stream(m: ModuleType) -> None:
    _patch(m.Stream, "recv", _async_around, "recv")
    _patch(m.Stream, "send_last", _async_before, "send_last")
    _patch(m.Stream, "_deliver", _before, "deliver")


def _mux(m: ModuleType) -> None:
    _patch(m.Mux, "open", _async_around, "open")
    _patch(m.Mux, "_serve", _async_before, "serve")
    _patch(m.Mux, "_dispatch", _around, "mux.dispatch")
    _patch(m.Mux, "_accept_stream", _around, "mux.accept")


def _link(m: ModuleType) -> None:
    for name in ("_on_message", "_on_message_fused"):
        if hasattr(m.Link, name):
            _patch(m.Link, name, _around, "on_message")


def _sqlite_append(m: ModuleType) -> None:
    _patch(m.SqliteAppender, "_insert", _around, "sql.insert")


def _http1(m: ModuleType) -> None:
    _patch(m.Http1Pool, "request", _async_around, "up.request")
    _patch(m._Connection, "data_received", _before, "up.read")
    _patch(m._Connection, "on_headers_complete", _after, "up.head")
    _patch(m._Connection, "on_message_complete", _after, "up.end")
    _patch(m.Http1Response, "read", _async_around, "up.body")
    _patch(m.Http1Response, "release", _around, "up.release")


def _openai_http(m: ModuleType) -> None:
    _patch(m, "usage_of", _around, "usage_of")


def _node_link(m: ModuleType) -> None:
    _patch(m, "answer", _async_before, "answer")


def _protocol(m: ModuleType) -> None:
    m.OpenRequest.from_wire = classmethod(_around("from_wire", m.OpenRequest.from_wire.__func__))


def _pipeline(m: ModuleType) -> None:
    _patch(m.Answering, "__aenter__", _async_around, "aenter")
    _patch(m.Pipeline, "answer", _around, "pipe.answer")


def _meter(m: ModuleType) -> None:
    _patch(m.Meter, "answered", _around, "answered")
    _patch(m.Meter, "__init__", _around, "meter")


def _models(m: ModuleType) -> None:
    _patch(m.Lending, "__aenter__", _async_around, "lend")
    _patch(m.Lending, "__aexit__", _async_around, "unlend")


def _served(m: ModuleType) -> None:
    _patch(m.NodeAttempt, "collect", _async_around, "collect")
    if os.environ.get("MESHGATE_TIMELINE_FINE"):
        _patch(m.NodeAttempt, "_drain", _around, "drain")
        _patch(m.NodeAttempt, "close", _async_around, "close")
        _patch(m.Served, "row", _around, "row")


def _uvicorn(m: ModuleType) -> None:
    _patch(m.HttpToolsProtocol, "data_received", _before, "uv.read")
    _patch(m.HttpToolsProtocol, "on_headers_complete", _around, "uv.headers")

    send = m.RequestResponseCycle.send

    @functools.wraps(send)
    async def wrapped(self: Any, message: Any) -> None:
        await send(self, message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            _stamps.append(("uv.write", _clock()))

    m.RequestResponseCycle.send = wrapped


def _journal(m: ModuleType) -> None:
    if os.environ.get("MESHGATE_TIMELINE_FINE"):
        _patch(m.LedgerJournal, "append", _around, "journal")


PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "coordinator.ledger_journal": _journal,
    "meshgate.http_protocols": _http_protocols,
    "meshgate.http_hot": _http_hot,
    "coordinator.api": _api,
    "coordinator.dispatch": _dispatch,
    "coordinator.api_context": _api_context,
    "tunnel.wire": _wire,
    "tunnel.link_writer": _link_writer,
    "tunnel.stream": _stream,
    "tunnel.mux": _mux,
    "tunnel.link": _link,
    "coordinator.store.sqlite_append": _sqlite_append,
    "tunnel.connection": _connection,
    "coordinator.hot_routes": _hot_routes,
    "node_agent.runtimes.http1": _http1,
    "node_agent.runtimes.openai_http": _openai_http,
    "node_agent.link": _node_link,
    "node_agent.pipeline": _pipeline,
    "meshgate.protocol": _protocol,
    "node_agent.request_meter": _meter,
    "node_agent.models": _models,
    "coordinator.served": _served,
    "uvicorn.protocols.http.httptools_impl": _uvicorn,
}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any, patch: Callable[[ModuleType], None]) -> None:
        self.inner, self.patch = inner, patch

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        self.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        patch = PATCHES.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, patch)
        return spec


def _role() -> str:
    if "coordinator.api" in sys.modules:
        return "coordinator"
    if "node_agent.link" in sys.modules:
        return "node"
    return "upstream"


def _clear(signum: int, frame: FrameType | None) -> None:
    _stamps.clear()


def _dump(signum: int, frame: FrameType | None) -> None:
    path = os.path.join(_folder or ".", f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as out:
        json.dump({"role": _role(), "stamps": _stamps}, out)
    os.replace(path + ".tmp", path)


if _folder:
    sys.meta_path.insert(0, _Finder())
    signal.signal(signal.SIGUSR1, _clear)
    signal.signal(signal.SIGUSR2, _dump)
