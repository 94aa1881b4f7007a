"""What rides inside a tunnel stream between the coordinator and a node.

The tunnel carries opaque frames; this module gives them meaning for LLM
requests. One request is one stream:

coordinator -> node  ``OPEN``  :class:`OpenRequest` as a map
node -> coordinator  ``DATA``  bytes: the whole JSON response (non-streaming)
                               or one JSON chunk per frame (streaming)
node -> coordinator  ``END``   ``{"usage": {...} | None}``
node -> coordinator  ``ERROR`` ``{"status", "message", "code", "hop"}``
coordinator -> node  ``CANCEL`` the client went away: stop generating

Control frames (stream 0): ``TELEMETRY`` and ``INVENTORY`` from the node,
``COMMAND`` from the coordinator answered by ``RESULT``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
        try:
            request = cls(
                request_id=body["request_id"],
                endpoint=body["endpoint"],
                model=body["model"],
                stream=body["stream"],
                body=body["body"],
            )
        except KeyError as exc:
            raise ProtocolViolation(f"open body lacks {exc}") from None
        if request.endpoint not in ENDPOINTS:
            raise ProtocolViolation(f"unknown endpoint {request.endpoint!r}")
        if not (
            isinstance(request.request_id, str)
            and isinstance(request.model, str)
            and isinstance(request.stream, bool)
            and isinstance(request.body, bytes)
        ):
            raise ProtocolViolation("open body has a field of the wrong type")
        return request


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
        str(got.get("message") or default),
        code=code if isinstance(code, str) else None,
        param=param if isinstance(param, str) else None,
        hop=str(got.get("hop") or hop),
    )
