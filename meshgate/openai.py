"""OpenAI's wire format: error objects, request validation and SSE framing.

Every HTTP error meshgate returns has OpenAI's shape, so the official SDKs
raise their usual exception classes with our message::

    {"error": {"message": "...", "type": "invalid_request_error",
               "param": null, "code": "model_not_found"}}

`hop` says which part of meshgate produced the error (``node``,
``coordinator``, ``runner``, ``upstream``) so an operator reading a client's
log knows where to look.
"""

from __future__ import annotations

import json
from typing import Any

ENDPOINTS = ("chat/completions", "completions", "embeddings")
MAX_BODY_BYTES = 4 * 1024 * 1024
SSE_DONE = b"data: [DONE]\n\n"

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class OpenAIError(Exception):
    """An error that becomes an OpenAI-shaped HTTP response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        hop: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.hop = hop

    @property
    def type(self) -> str:
        return _TYPE_BY_STATUS.get(self.status, "server_error")

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        if self.hop is not None:
            error["hop"] = self.hop
        return {"error": error}

    @classmethod
    def from_body(cls, status: int, body: Any, *, hop: str | None = None) -> OpenAIError:
        """Rebuild an error from a response body (ours or any OpenAI-compatible server's)."""
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            message = str(error.get("message") or "unknown error")
            code = error.get("code")
            return cls(
                status,
                message,
                code=str(code) if code is not None else None,
                hop=str(error.get("hop") or hop) if (error.get("hop") or hop) else None,
            )
        return cls(status, str(body)[:500] or "unknown error", hop=hop)


def parse_request(raw: bytes, endpoint: str, *, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """Validate a request body for `endpoint` and return it parsed.

    Checks only what meshgate itself relies on (size, JSON, `model`, the
    prompt or messages); the runner validates the rest and its errors are
    passed through unchanged.
    """
    if len(raw) > max_bytes:
        raise OpenAIError(413, f"request body is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "'model' is required and must be a string", param="model")
    if endpoint == "chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise OpenAIError(400, "'messages' must be a non-empty list", param="messages")
        if not all(isinstance(m, dict) and "role" in m for m in messages):
            raise OpenAIError(400, "each message must be an object with a 'role'", param="messages")
    elif endpoint == "completions" and not isinstance(body.get("prompt"), str | list):
        raise OpenAIError(400, "'prompt' is required", param="prompt")
    elif endpoint == "embeddings" and not isinstance(body.get("input"), str | list):
        raise OpenAIError(400, "'input' is required", param="input")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIError(400, "'stream' must be a boolean", param="stream")
    return body


def unknown_model(model: str, *, hop: str) -> OpenAIError:
    return OpenAIError(
        404, f"The model '{model}' does not exist or is not served here", code="model_not_found",
        param="model", hop=hop,
    )


def sse_event(data: bytes) -> bytes:
    """One server-sent event carrying `data` (a JSON document without newlines)."""
    return b"data: " + data + b"\n\n"


def sse_error(error: OpenAIError) -> bytes:
    """The event that ends a stream which failed after it started."""
    return sse_event(json.dumps(error.body()).encode())


def model_list(names: list[str], *, owned_by: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": owned_by} for n in sorted(names)
        ],
    }
