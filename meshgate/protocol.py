"""What rides inside a tunnel stream between the coordinator and a node.

The tunnel carries opaque frames; this module gives them meaning for LLM
requests. One request is one stream:

coordinator -> node  ``OPEN``  :class:`OpenRequest` as a map
node -> coordinator  ``DATA``  bytes: the whole JSON response (non-streaming)
                               or one JSON chunk per frame (streaming)
node -> coordinator  ``END``   ``{"usage": {...} | None}``, plus, where the node meters
                               energy, ``joules`` (float | None: not measured),
                               ``energy_estimated`` (bool) and ``energy_cost``
                               (float | None: at the node's electricity price)
node -> coordinator  ``ERROR`` ``{"status", "message", "code", "hop"}``
coordinator -> node  ``CANCEL`` the client went away: stop generating

A node also opens one kind of stream of its own besides requests: the upload
of its offline usage journal, ``OPEN {"usage_journal": [row, ...]}`` answered
by ``END {"ingested": n, "duplicates": m}`` or ``ERROR`` (see
:func:`journal_rows`).

Control frames (stream 0): ``TELEMETRY`` and ``INVENTORY`` from the node,
``COMMAND`` from the coordinator answered by ``RESULT``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from meshgate.bounds import MAX_ERROR_CHARS, clip, is_sane_request_id
from meshgate.openai import ENDPOINTS, OpenAIError


class ProtocolViolation(ValueError):
    """A stream message that does not follow this module's rules."""


@dataclass(frozen=True, slots=True)
class OpenRequest:
    request_id: str
    endpoint: str
    model: str
    stream: bool
    body: bytes

    def to_wire(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "model": self.model,
            "stream": self.stream,
            "body": self.body,
        }

    @classmethod
    def from_wire(cls, body: Any) -> OpenRequest:
        if not isinstance(body, dict):
            raise ProtocolViolation("open body must be a map")
        try:  # checked before the (frozen: slower to make) request is made
            request_id, endpoint, model = body["request_id"], body["endpoint"], body["model"]
            stream, raw = body["stream"], body["body"]
        except KeyError as exc:
            raise ProtocolViolation(f"open body lacks {exc}") from None
        if endpoint not in ENDPOINTS:
            raise ProtocolViolation(f"unknown endpoint {clip(repr(endpoint), 60)}")
        if not is_sane_request_id(request_id):
            raise ProtocolViolation(
                f"request_id must be 1-128 of letters, digits and ._:- (got "
                f"{clip(repr(request_id), 60)})")
        if not (isinstance(model, str) and isinstance(stream, bool) and isinstance(raw, bytes)):
            raise ProtocolViolation("open body has a field of the wrong type")
        return cls(request_id, endpoint, model, stream, raw)


def error_body(
    status: int, message: str, *, code: str | None = None, hop: str = "node",
    param: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"status": status, "message": message, "code": code, "hop": hop}
    if param is not None:
        body["param"] = param
    return body


def error_of(body: Any, *, hop: str, default: str) -> OpenAIError:
    """The OpenAIError an ERROR frame's body describes (see `error_body`); a body that does
    not say is a 502 with `default` as its message, from `hop`."""
    got = body if isinstance(body, dict) else {}
    status, code, param = got.get("status"), got.get("code"), got.get("param")
    return OpenAIError(
        status if isinstance(status, int) and 400 <= status <= 599 else 502,
        clip(str(got.get("message") or default), MAX_ERROR_CHARS),
        code=code if isinstance(code, str) else None,
        param=param if isinstance(param, str) else None,
        hop=clip(str(got.get("hop") or hop), 40),
    )


JOURNAL_KEY = "usage_journal"
#: At most this many rows in one journal upload.
MAX_JOURNAL_ROWS = 1000
#: More than this per request is not a reading (a 1 kW box running for 10 days).
MAX_JOULES = 1e9


def joules_of(value: Any) -> float | None:
    """A node's joules figure if it is a sane one (finite, 0..MAX_JOULES), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and 0.0 <= number <= MAX_JOULES else None


@dataclass(frozen=True, slots=True)
class EnergyReport:
    """The energy fields of an END body (or a journal row)."""

    joules: float | None = None
    estimated: bool = False
    cost: float | None = None

    @classmethod
    def from_wire(cls, body: Any) -> EnergyReport:
        got = body if isinstance(body, dict) else {}
        cost = got.get("energy_cost")
        return cls(
            joules_of(got.get("joules")),
            got.get("energy_estimated") is True,
            joules_of(cost) if cost is not None else None,  # same sanity bounds
        )


def journal_rows(body: Any) -> list[dict[str, Any]] | None:
    """The rows of a journal upload's OPEN body; None when the body is not one."""
    if not isinstance(body, dict) or JOURNAL_KEY not in body:
        return None
    rows = body[JOURNAL_KEY]
    if not isinstance(rows, list) or len(rows) > MAX_JOURNAL_ROWS:
        raise ProtocolViolation(f"{JOURNAL_KEY} must be a list of at most "
                                f"{MAX_JOURNAL_ROWS} rows")
    if not all(isinstance(r, dict) for r in rows):
        raise ProtocolViolation(f"every {JOURNAL_KEY} row must be a map")
    return rows
