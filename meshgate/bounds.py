"""Bounds on what a peer controls: usage claims, request ids, strings that reach a log.

Everything here is a pure function over untrusted values (a node's END frame,
an OPEN frame's request id, an error message a node wrote). Each bound is
chosen far above any honest value and far below what would hurt us:

- ``MAX_TOKENS_CLAIM`` (1e9): no model runs a billion-token request (the
  largest context windows are ~1e7), and a billion per row keeps every sum over
  the ledger far inside int64 (9.2e18), SQLite's and PostgreSQL's BIGINT.
- ``REQUEST_ID`` (1-128 of ``[A-Za-z0-9._:-]``): what the public API already
  accepts in ``X-Request-Id``; the same rule on every path (a node's OPEN too).
- ``LOG_FIELD_CHARS`` (200): a peer string quoted in a log line (a model name,
  an error message) is cut there, with its full length said, never echoed whole.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

__all__ = [
    "LOG_FIELD_CHARS",
    "MAX_ERROR_CHARS",
    "MAX_TOKENS_CLAIM",
    "check_chunk",
    "clamp_tokens",
    "clamp_usage",
    "clip",
    "is_sane_request_id",
    "load_json",
]

MAX_TOKENS_CLAIM = 1_000_000_000
LOG_FIELD_CHARS = 200
MAX_ERROR_CHARS = 2000
"""An error message a peer sent is cut to this before it is logged or passed to a client."""

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def is_sane_request_id(value: object) -> bool:
    return isinstance(value, str) and _REQUEST_ID.fullmatch(value) is not None


def clamp_tokens(value: object) -> int | None:
    """A token count a peer claims, as an int in [0, MAX_TOKENS_CLAIM]; None when it is not
    a number at all (a string, a map, NaN, a bool)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        value = MAX_TOKENS_CLAIM if value > MAX_TOKENS_CLAIM else max(value, 0.0)
        return int(value)
    if isinstance(value, int):
        return min(max(value, 0), MAX_TOKENS_CLAIM)
    return None


def clamp_usage(usage: object) -> tuple[dict[str, int] | None, list[str]]:
    """A usage claim (``{"prompt_tokens", "completion_tokens", "total_tokens"}``) made safe
    to bill: each count an int in [0, MAX_TOKENS_CLAIM], unknown keys dropped, a missing or
    unreadable count 0. Returns the usage (None when there was none) and what was wrong
    with the claim (empty when nothing), for a log line."""
    if usage is None:
        return None, []
    if not isinstance(usage, dict):
        return None, [f"usage is a {type(usage).__name__}, not a map"]
    out: dict[str, int] = {}
    problems: list[str] = []
    for name in USAGE_FIELDS[:2]:
        raw = usage.get(name, 0)
        value = clamp_tokens(raw)
        if value is None:
            problems.append(f"{name} is not a number ({clip(repr(raw), 40)})")
            value = 0
        elif value != raw:
            problems.append(f"{name} {clip(repr(raw), 40)} clamped to {value}")
        out[name] = value
    if "total_tokens" in usage:  # said again as the sum, whatever was claimed
        out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    return out, problems


def clip(value: Any, limit: int = LOG_FIELD_CHARS) -> str:
    """`value` as a string of at most about `limit` characters, saying how long it was."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…(+{len(text) - limit} chars)"


def check_chunk(data: object, *, streaming: bool) -> bytes:
    """A node's DATA body, checked before it goes to a client; raises ValueError saying what
    is wrong. Non-streaming: bytes. Streaming: one JSON object on one line, so that the
    coordinator's ``data: ...\\n\\n`` framing makes exactly one event of it (a node's CR or
    LF would end the event early and let it write events, or ``[DONE]``, of its own)."""
    if not isinstance(data, bytes):
        raise ValueError(f"a DATA body must be bytes, not {type(data).__name__}")
    if not streaming:
        return data
    if b"\n" in data or b"\r" in data:
        raise ValueError("a stream chunk is not one JSON object on one line (it holds a "
                         "line break)")
    try:
        parsed = load_json(data)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ValueError("a stream chunk is not one JSON object")
    return data


def load_json(raw: bytes | str) -> Any:
    """JSON from a peer, parsed without recursion: nesting past 200 levels is a ValueError
    saying so, never a RecursionError (pydantic-core's parser, as meshgate.openai uses)."""
    try:
        return (_from_json or _json_parser())(raw)
    except ValueError as exc:
        if "recursion limit" in str(exc):
            raise ValueError("nested too deeply (more than 200 levels of arrays and "
                             "objects)") from None
        raise


_from_json: Callable[[bytes | str], Any] | None = None


def _json_parser() -> Callable[[bytes | str], Any]:
    """pydantic-core's parser, imported on the first :func:`load_json` (5 MiB an idle node
    does not need: issue 10, tests/node/test_idle_imports.py)."""
    global _from_json  # noqa: PLW0603 (bound once, then read on every call)
    import pydantic_core

    _from_json = pydantic_core.from_json
    return _from_json
