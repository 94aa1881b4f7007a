"""Both daemons' logs: JSON or text lines that carry the request id, one access line each.

Every API request gets an id: the client's `X-Request-Id` when it is a sane
token (1-128 characters of letters, digits and `._:-`), else a fresh
`req_<16 hex>`. `RequestIdMiddleware` puts it in a context variable for the
whole request (so every log line written while handling it, in any module,
carries `request_id`), in `request.state.request_id`, and in the response's
`X-Request-Id` header. The same id goes to the node in the OPEN frame
(`OpenRequest.request_id`), so the node's log lines carry it too.

`setup_logging(format, level)` (``--log-format json|text``) makes the root
logger write one JSON object a line (ts, level, logger, message, request_id
when there is one, and any `extra={...}` fields that are plain JSON values:
a library's objects, like the websocket websockets attaches to its records,
are left out rather than written as ``<ServerConnection object at 0x...>``)
or one text line (the same fields, ``key=value``). It quiets the loggers that
would write a line per request of their own: httpx's and httpcore's
``HTTP Request: ...`` (the node's runner calls, the coordinator's cloud calls)
and uvicorn's access log, which `AccessLogMiddleware` replaces with one line
per request: request id, method, route, status, model, tokens and latency.
Handlers put what they know in ``request.state``: ``model``, and ``usage``
(a dict) or ``served`` (an object with ``usage``) once the answer is done.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshgate.logflood import FloodFilter

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_BYTES = REQUEST_ID_HEADER.encode()
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "meshgate_request_id", default=None
)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's copy of the message with terminal colours
}


def new_request_id() -> str:
    return "req_" + secrets.token_hex(8)


def accept_request_id(value: str | None) -> str:
    """The client's id if it is sane, else a fresh one."""
    return value if value and _SANE_ID.match(value) else new_request_id()


def current_request_id() -> str | None:
    return request_id_var.get()


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            out["request_id"] = request_id
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _JSON.encode(out)


#: json.dumps with these options would make an encoder for every line
_JSON = json.JSONEncoder(default=str, ensure_ascii=False)
_PLAIN = (str, int, float, bool, type(None))
_SCALARS = frozenset(_PLAIN)


def _iso(created: float) -> str:
    """``datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")``, its
    seconds made once a second (a line per request writes many in each)."""
    second = int(created)
    micros = round((created - second) * 1e6)  # as datetime rounds it (half to even)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    if second != _last_second[0]:
        _last_second[:] = [second, datetime.fromtimestamp(second, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S")]
    return f"{_last_second[1]}.{micros // 1000:03d}+00:00"


_last_second: list[Any] = [None, ""]


def _plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, list | tuple):
        return all(isinstance(v, _PLAIN) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and isinstance(v, _PLAIN) for k, v in value.items())
    return False


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """A record's `extra` fields that are plain JSON values (a library's objects are not)."""
    fields = vars(record)
    extra = fields.keys() - _NOT_EXTRA  # most records have none: one set difference
    if not extra:
        return {}
    return {name: value for name, value in fields.items()
            if name in extra and not name.startswith("_")
            and (type(value) in _SCALARS or _plain(value))}


_NOT_EXTRA = frozenset(_STANDARD | {"request_id"})


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: message [request_id=...] [key=value ...]``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = _iso(record.created)
        line = f"{ts} {record.levelname} {record.name}: {record.getMessage()}"
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        fields = ({"request_id": request_id} if request_id else {}) | _extras(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


#: Loggers that would write a line of their own for every request.
CHATTY = ("httpx", "httpcore", "uvicorn.access", "websockets.server", "websockets.client")
LOG_FORMATS = ("json", "text")


def setup_logging(fmt: str = "json", level: str = "info",
                  stream: TextIO | None = None) -> logging.Handler:
    """One handler on the root logger writing `fmt` ("json" or "text") lines; returns it."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be json or text, not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # neither format writes a record's process or thread: not looked up for every record
    logging.logProcesses = logging.logMultiprocessing = logging.logThreads = False
    if logging.getLevelName(level.upper()) != logging.DEBUG:
        for name in CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
    return handler


def setup_json_logging(level: str = "info", stream: TextIO | None = None) -> logging.Handler:
    """Replace the root logger's handlers with one JSON handler; returns it."""
    return setup_logging("json", level, stream)


def given_request_id(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The client's ``x-request-id``, as sent (None when it sent none)."""
    for name, value in headers:
        if name.lower() == _REQUEST_ID_BYTES:
            return value.decode("latin-1")
    return None


class RequestIdMiddleware:
    """Pure ASGI (streaming responses keep the id in their context to the last chunk)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = given_request_id(scope.get("headers", []))
        request_id = accept_request_id(given)
        scope.setdefault("state", {})["request_id"] = request_id
        if given != request_id:  # handlers and inner middleware read the same id
            scope["headers"] = [
                *(h for h in scope.get("headers", []) if h[0].lower() != b"x-request-id"),
                (b"x-request-id", request_id.encode()),
            ]
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.decode("latin-1").lower() != REQUEST_ID_HEADER
                ]
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


access_log = logging.getLogger("meshgate.access")


def set_access_log(on: bool) -> None:
    """Access lines on (INFO, the default) or off (``--no-access-log``)."""
    access_log.setLevel(logging.NOTSET if on else logging.WARNING)


class AccessLogMiddleware:
    """One info line per HTTP request when its answer has been sent (pure ASGI, so a
    stream's line comes after its last byte): request id, method, route, status, model,
    tokens, latency. Put it inside `RequestIdMiddleware` (added before it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_noting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_noting)
        except BaseException:
            status = 499 if status == 500 else status
            raise
        finally:
            access_line(scope, status, time.perf_counter() - started)


def access_line(scope: Scope, status: int, seconds: float) -> None:
    """Write the access line of the request of `scope` (answered `status`, `seconds` after
    it began) if access lines are on."""
    if not access_log.isEnabledFor(logging.INFO):
        return  # off (`set_access_log`): nothing to build; never flood-limited (logflood.py)
    state = scope.get("state") or {}
    route = scope.get("route")
    path = getattr(route, "path", None) or scope.get("path", "")
    usage = state.get("usage")
    served = state.get("served")
    if usage is None and served is not None:
        usage = getattr(served, "usage", None)
    fields: dict[str, Any] = {
        **({} if request_id_var.get() else {"request_id": state.get("request_id")}),
        "method": scope.get("method", ""), "route": str(path)[:200], "status": status,
        "model": str(state.get("model") or "-")[:200],
        "latency_ms": round(seconds * 1000, 1),
    }
    if isinstance(usage, dict):
        fields["prompt_tokens"] = usage.get("prompt_tokens")
        fields["completion_tokens"] = usage.get("completion_tokens")
    _quick_record(access_log, _ACCESS, (fields["method"], fields["route"], status,
                                       fields["latency_ms"]), fields)


_ACCESS = "%s %s %d %.1f ms"


def flood_drops(logger: logging.Logger, msg: str) -> bool:
    """Whether an INFO line `msg` of `logger` is dropped by the flood filter now (counted as
    dropped: meshgate/logflood.py), before its record is made. Only where the record would
    reach one handler, whose filters include a FloodFilter, and `logger` has no filter of
    its own; anywhere else False (the record is made and filtered as usual)."""
    if logger.filters:
        return False
    handler = None
    current: logging.Logger | None = logger
    while current is not None:
        for each in current.handlers:
            if each.level <= logging.INFO:
                if handler is not None:
                    return False
                handler = each
        current = current.parent if current.propagate else None
    if handler is None:
        return False
    flood = None
    for kept in handler.filters:  # ours only: one that refuses would change what is counted
        if isinstance(kept, FloodFilter):
            flood = kept
        elif not isinstance(kept, RequestIdFilter):
            return False
    return flood is not None and flood.drops(logger.name, logging.INFO, msg)


def quick_info(logger: logging.Logger, msg: str, *args: Any,
               extra: dict[str, Any] | None = None) -> None:
    """`logger.info(msg, *args, extra=extra)` for a line written per request: the record is
    made here, without the stack walk that names its caller (no format writes it), as a
    copy of a record made once per logger and thread with its time, message and `extra`
    set (``LogRecord.__init__`` asks the thread's and the process's names, splits the
    file's path and looks the level's name up again for every line)."""
    if logger.isEnabledFor(logging.INFO) and not flood_drops(logger, msg):
        _quick_record(logger, msg, args, extra)


def _quick_record(logger: logging.Logger, msg: str, args: tuple[Any, ...],
                  extra: dict[str, Any] | None) -> None:
    """`quick_info`'s record, made and handled (INFO is on, the flood filter asked)."""
    if logging.getLogRecordFactory() is not logging.LogRecord:  # someone's own records
        logger.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, msg, args,
                                        None, extra=extra))
        return
    key = (logger.name, threading.get_ident())
    template = _TEMPLATES.get(key)
    if template is None:
        if len(_TEMPLATES) >= 256:  # threads come and go: bounded
            _TEMPLATES.clear()
        template = _TEMPLATES[key] = vars(logger.makeRecord(
            logger.name, logging.INFO, __file__, 0, "", (), None))
    record = logging.LogRecord.__new__(logging.LogRecord)
    fields = record.__dict__
    fields.update(template)
    now = time.time()
    fields["created"] = now
    fields["msecs"] = int((now - int(now)) * 1000) + 0.0
    fields["relativeCreated"] = (now - _LOGGING_START) * 1000
    fields["msg"] = msg
    fields["args"] = (args[0] if len(args) == 1 and isinstance(args[0], Mapping) and args[0]
                      else args)  # as LogRecord takes a lone mapping
    if extra:
        for name in extra:
            if name in ("message", "asctime") or name in fields:
                raise KeyError(f"Attempt to overwrite {name!r} in LogRecord")
        fields.update(extra)
    logger.handle(record)


#: (logger name, thread) -> the fields of a record made the usual way (quick_info copies it)
_TEMPLATES: dict[tuple[str, int], dict[str, Any]] = {}
_LOGGING_START: float = logging._startTime  # type: ignore[attr-defined]  # relativeCreated's 0
os.register_at_fork(after_in_child=_TEMPLATES.clear)  # a record names its process
