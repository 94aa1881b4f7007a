"""An access line written straight to the one handler that would write it.

A line per request made as a log record goes through the logger, its handlers' filters
and the formatter, which looks for the record's extra fields among its ~25 attributes:
~10 Python calls and most of an access line's cost. Where the record would reach a single
`logging.StreamHandler` whose formatter is one of ours and whose filters are ours (the
daemons' own setup, `meshgate.logs.setup_logging`), the line is the formatter's own
``line(...)`` of the same fields, written as the handler writes it (under its lock,
flushed). Anywhere else (a record factory of someone's, a second handler, pytest's
capture, a filter of someone's) `direct_handler` says None and the record is made.
"""

from __future__ import annotations

import logging
from typing import Any

from meshgate.logflood import FloodFilter


def direct_handler(logger: logging.Logger, formatters: tuple[type, ...],
                   filters: tuple[type, ...]) -> logging.StreamHandler[Any] | None:
    """The handler an INFO record of `logger` would reach, if writing its line directly
    is the same as logging the record (see the module doc); else None."""
    if logger.filters or logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    handler = None
    current: logging.Logger | None = logger
    while current is not None:  # as Logger.callHandlers walks them
        for each in current.handlers:
            if each.level <= logging.INFO:
                if handler is not None:
                    return None
                handler = each
        current = current.parent if current.propagate else None
    if (type(handler) is not logging.StreamHandler
            or type(handler.formatter) not in formatters):
        return None
    for kept in handler.filters:
        if type(kept) in filters:
            continue
        if type(kept) is FloodFilter and logger.name in kept.exempt:
            continue  # lets the line through untouched (logflood.py)
        return None
    return handler


def write_direct(handler: logging.StreamHandler[Any], line: str) -> None:
    """`line` written as `StreamHandler.emit` and `flush` write a formatted record."""
    handler.acquire()
    try:
        stream = handler.stream
        stream.write(line + handler.terminator)
        stream.flush()
    finally:
        handler.release()
