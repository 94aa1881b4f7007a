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

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

if TYPE_CHECKING:
    from pydantic import ValidationError

    from meshgate.schema import ChatRequest, OpenAIRequest

# meshgate.schema (pydantic's request models, ~11 MiB once built) and pydantic_core load on
# the first parse(), not at import: an idle node imports this module for OpenAIError alone
# and must not pay for request validation (issue 10; tests/node/test_idle_imports.py).

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
            param = error.get("param")
            return cls(
                status,
                message,
                code=str(code) if code is not None else None,
                param=str(param) if param is not None else None,
                hop=str(error.get("hop") or hop) if (error.get("hop") or hop) else None,
            )
        return cls(status, str(body)[:500] or "unknown error", hop=hop)


#: The deepest JSON nesting a body may have (pydantic-core's parser refuses deeper at 200).
MAX_DEPTH = 200
_PROMPT_PARAM = {"chat/completions": "messages", "completions": "prompt", "embeddings": "input"}


@dataclass(frozen=True, slots=True)
class Parsed:
    """A request body parsed and validated once; every later step reads it from here."""

    endpoint: str
    raw: bytes
    body: dict[str, Any]
    """the JSON object as sent (unknown fields included)"""
    request: OpenAIRequest

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def stream(self) -> bool:
        return bool(getattr(self.request, "stream", False))

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with the usage chunk (``stream_options.include_usage``)."""
        options = getattr(self.request, "stream_options", None)
        return bool(self.stream and options is not None and options.include_usage)

    @property
    def max_tokens(self) -> int | None:
        """The completion tokens asked for (``max_tokens`` or ``max_completion_tokens``)."""
        asked = getattr(self.request, "max_tokens", None)
        if asked is None:
            asked = getattr(self.request, "max_completion_tokens", None)
        return asked if isinstance(asked, int) else None

    @property
    def prompt_param(self) -> str:
        return _PROMPT_PARAM[self.endpoint]

    def prompt_text(self) -> str:
        """The prompt's text, for estimates (messages' text parts, prompts, inputs)."""
        parsing = _parsing()  # (the models, imported by parse already: no import statement)
        request = self.request
        if isinstance(request, parsing.chat):
            parts: list[str] = []
            for m in request.messages:
                parts.append(m.role)
                if isinstance(m.content, str):
                    parts.append(m.content)
                elif isinstance(m.content, list):
                    parts.extend(str(p.get("text", "")) for p in m.content)
                for call in m.tool_calls or ():
                    parts.extend((call.function.name, call.function.arguments))
            for tool in request.tools or ():
                parts.append(json.dumps(tool.function.model_dump(mode="json")))
            return "\n".join(parts)
        from meshgate.schema import CompletionRequest, EmbeddingRequest

        found = (request.prompt if isinstance(request, CompletionRequest)
                 else cast("EmbeddingRequest", request).input)
        if isinstance(found, str):
            return found
        return "\n".join(x if isinstance(x, str) else " ".join(map(str, x)) if
                         isinstance(x, list) else str(x) for x in found)

    def prompt_tokens_estimate(self) -> int:
        """Prompt tokens as a BPE tokenizer would count them on English text, rounded up
        (about 4 bytes a token, plus a few per chat message for its template)."""
        text = self.prompt_text().encode()
        request = self.request
        per_message = len(request.messages) * 8 if isinstance(request, _parsing().chat) else 0
        return len(text) // 3 + 1 + per_message


class _Parsing(NamedTuple):
    """What `parse` needs of pydantic and meshgate.schema, imported on its first call."""

    from_json: Callable[[bytes], Any]
    invalid: type[ValidationError]
    models: dict[str, type[OpenAIRequest]]
    chat: type[ChatRequest]
    describe: Callable[[ValidationError], tuple[str, str, str]]


@functools.cache
def _parsing() -> _Parsing:
    import pydantic_core
    from pydantic import ValidationError

    from meshgate.schema import REQUEST_MODELS, ChatRequest, describe

    return _Parsing(pydantic_core.from_json, ValidationError, REQUEST_MODELS, ChatRequest,
                    describe)


def parse(raw: bytes, endpoint: str, *, max_bytes: int = MAX_BODY_BYTES) -> Parsed:
    """Parse and validate a request body for `endpoint` against OpenAI's schema.

    Raises :class:`OpenAIError` 413 for an oversize body and 400, naming ``param``
    the way OpenAI does, for anything else: not JSON, nested deeper than
    :data:`MAX_DEPTH`, not an object, a missing field, a wrong type or a value out
    of range. Unknown fields are allowed and kept.
    """
    parsing = _parsing()  # (imported once, on the first call: see the note at the top)
    if len(raw) > max_bytes:
        raise OpenAIError(413, f"request body is {len(raw)} bytes; the limit is {max_bytes}",
                          code="request_too_large")
    try:
        body = parsing.from_json(raw)
    except ValueError as exc:
        text = str(exc)
        if "recursion limit" in text:
            raise OpenAIError(400, f"request body is nested too deeply (more than {MAX_DEPTH} "
                              "levels of arrays and objects)", code="invalid_json") from None
        raise OpenAIError(400, f"We could not parse the JSON body of your request: {text}",
                          code="invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        request = parsing.models[endpoint].model_validate(body)
    except parsing.invalid as exc:
        message, param, code = parsing.describe(exc)
        raise OpenAIError(400, message, param=param, code=code) from None
    if isinstance(request, parsing.chat):
        _check_messages(request)
    return Parsed(endpoint, raw, body, request)


def _check_messages(request: ChatRequest) -> None:
    """What OpenAI requires of a message beyond its fields' types."""
    for i, m in enumerate(request.messages):
        calls = m.tool_calls or (m.model_extra or {}).get("function_call")
        if m.content is None and not (m.role == "assistant" and calls):
            raise OpenAIError(400, f"Missing required parameter: 'messages[{i}].content'.",
                              param=f"messages[{i}].content", code="missing_required_parameter")
        if m.role == "tool" and not m.tool_call_id:
            raise OpenAIError(400, f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                              param=f"messages[{i}].tool_call_id",
                              code="missing_required_parameter")


def parse_request(raw: bytes, endpoint: str, *, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The body of :func:`parse` (for callers that need only the JSON)."""
    return parse(raw, endpoint, max_bytes=max_bytes).body


def context_exceeded(
    n_ctx: int, prompt_tokens: int, completion_tokens: int | None, *, param: str, hop: str
) -> OpenAIError:
    """OpenAI's 400 for a request its model cannot hold, with the real numbers."""
    asked = prompt_tokens + (completion_tokens or 0)
    where = "in the messages" if param == "messages" else "in the prompt"
    detail = (f"{prompt_tokens} {where}, {completion_tokens} in the completion"
              if completion_tokens else f"{prompt_tokens} {where}")
    return OpenAIError(
        400, f"This model's maximum context length is {n_ctx} tokens. However, you requested "
        f"{asked} tokens ({detail}). Please reduce the length of the {param} or completion.",
        code="context_length_exceeded", param=param, hop=hop,
    )


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


def model_object(name: str, *, owned_by: str) -> dict[str, Any]:
    """One model as ``GET /v1/models/{id}`` answers it."""
    return {"id": name, "object": "model", "created": 0, "owned_by": owned_by}


def model_list(names: list[str], *, owned_by: str) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(n, owned_by=owned_by) for n in sorted(names)]}


def is_usage_only(chunk: bytes) -> bool:
    """Whether a stream chunk is the usage-only one (``choices: []`` and ``usage``) that
    OpenAI sends only with ``stream_options.include_usage``. Reads the JSON only when
    the bytes name a usage."""
    if b'"usage"' not in chunk or b'"choices"' not in chunk:
        return False
    try:
        data = json.loads(chunk)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("choices") == [] and bool(data.get("usage"))
