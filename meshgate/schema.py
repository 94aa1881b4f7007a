"""OpenAI's request schema as typed models, and its errors in OpenAI's words.

The models follow the published OpenAI API for ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/embeddings``: each field's type and range, the
required ones, and the fields other OpenAI-compatible servers add (llama.cpp's
``top_k``, ``min_p``, ``repeat_penalty``...). Unknown fields are kept, as
OpenAI's own SDKs send new ones before every server knows them.

Validation is strict about types, as OpenAI is: ``"max_tokens": "10"`` is an
error, not 10. A failure becomes the message OpenAI writes for it, naming the
parameter::

    Invalid 'temperature': decimal above maximum value. Expected a value <= 2,
    but got 5 instead.                       (param "temperature", 400)

Fields that take one of several shapes (``stop``, ``prompt``, ``input``,
message ``content``) are checked by small functions rather than pydantic
unions, so that the error names the field and not a union member.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

__all__ = [
    "REQUEST_MODELS",
    "ChatRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "Message",
    "OpenAIRequest",
    "describe",
]

#: The largest token count a request may name (OpenAI's own limits are far below it).
MAX_TOKENS_LIMIT = 2**31 - 1
#: The most inputs one embeddings request may carry (OpenAI's limit).
MAX_EMBEDDING_INPUTS = 2048


def _shape_error(what: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_type", "expected {what}", {"what": what})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _stop(v: Any) -> Any:
    if v is None or isinstance(v, str):
        return v
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _shape_error("a string or an array of strings")
    if len(v) > 4:
        raise PydanticCustomError(
            "array_above_max_length", "array too long. Expected an array with maximum length 4, "
            "but got an array with length {n} instead.", {"n": len(v)})
    return v


def _text_or_tokens(v: Any, *, nonempty: bool) -> Any:
    """A string, an array of strings, an array of token ids, or an array of such arrays."""
    if isinstance(v, str):
        ok = bool(v) or not nonempty
    elif isinstance(v, list):
        ok = bool(v) or not nonempty
        ok = ok and (
            all(isinstance(x, str) and (x or not nonempty) for x in v)
            or all(_is_int(x) for x in v)
            or all(isinstance(x, list) and all(_is_int(t) for t in x) and (x or not nonempty)
                   for x in v)
        )
    else:
        raise _shape_error("a string, an array of strings or an array of token arrays")
    if not ok:
        raise PydanticCustomError(
            "invalid_value", "expected a non-empty string, array of strings or array of "
            "token arrays, with no empty element")
    return v


def _prompt(v: Any) -> Any:
    return _text_or_tokens(v, nonempty=False)


def _input(v: Any) -> Any:
    v = _text_or_tokens(v, nonempty=True)
    if isinstance(v, list) and len(v) > MAX_EMBEDDING_INPUTS and not _is_int(v[0]):
        raise PydanticCustomError(
            "array_above_max_length", "array too long. Expected an array with maximum length "
            "{limit}, but got an array with length {n} instead.",
            {"limit": MAX_EMBEDDING_INPUTS, "n": len(v)})
    return v


def _content(v: Any) -> Any:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str)
                                   for p in v):
        return v
    raise _shape_error("a string or an array of content parts, each an object with a 'type'")


def _choice(v: Any) -> Any:
    if v is None or v in ("none", "auto", "required"):
        return v
    if isinstance(v, dict) and isinstance(v.get("type"), str):
        return v
    raise _shape_error("'none', 'auto', 'required' or an object naming a tool")


Stop = Annotated[Any, AfterValidator(_stop)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]


class _Open(BaseModel):
    """Unknown fields are kept (OpenAI's SDKs send new ones first); types are strict."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class FunctionCall(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Annotated[Any, AfterValidator(_content)] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Open):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Open):
    include_usage: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]


class _Sampling(_Open):
    """Fields both text endpoints share."""

    model: Annotated[str, Field(min_length=1)]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    # llama.cpp's and Ollama's additions
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    typical_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[float, Field(ge=0)] | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Annotated[Any, AfterValidator(_choice)] = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    prompt: Annotated[Any, AfterValidator(_prompt)]
    # a completion may ask for no new tokens (with echo, to score the prompt)
    max_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)] | None = None
    suffix: str | None = None
    echo: bool | None = None
    best_of: Annotated[int, Field(ge=0, le=20)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


class EmbeddingRequest(_Open):
    model: Annotated[str, Field(min_length=1)]
    input: Annotated[Any, AfterValidator(_input)]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None


OpenAIRequest = ChatRequest | CompletionRequest | EmbeddingRequest
#: The model that validates each endpoint's body (meshgate.openai.parse).
REQUEST_MODELS: dict[str, type[OpenAIRequest]] = {
    "chat/completions": ChatRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
}


# --- pydantic's errors in OpenAI's words ----------------------------------------------------

_KIND = {
    "int_type": "an integer", "float_type": "a number", "string_type": "a string",
    "bool_type": "a boolean", "list_type": "an array", "dict_type": "an object",
    "model_type": "an object", "model_attributes_type": "an object",
}


_JSON_TYPE = ((bool, "a boolean"), (int, "an integer"), (float, "a decimal"),
              (str, "a string"), (list, "an array"), (dict, "an object"))


def _json_type(v: Any) -> str:
    return next((name for t, name in _JSON_TYPE if isinstance(v, t)), "null")


def param_path(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "role")`` -> ``messages[0].role`` (OpenAI's spelling)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(v: Any) -> str:
    text = repr(v) if isinstance(v, str) else str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(exc: ValidationError) -> tuple[str, str, str]:  # noqa: PLR0911 (one per kind)
    """The first error of `exc` as OpenAI words it: (message, param, code)."""
    err = exc.errors(include_url=False)[0]
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    param = param_path(tuple(err["loc"]))
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    if kind in _KIND:
        return (f"Invalid type for '{param}': expected {_KIND[kind]}, but got "
                f"{_json_type(got)} instead.", param, "invalid_type")
    if kind == "invalid_type":
        return (f"Invalid type for '{param}': {err['msg']}, but got {_json_type(got)} instead.",
                param, "invalid_type")
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return _out_of_range(param, kind, ctx, got)
    if kind == "finite_number":
        return f"Invalid '{param}': expected a finite number.", param, "invalid_value"
    if kind == "literal_error":
        return (f"Invalid value for '{param}': {_short(got)}. Supported values are: "
                f"{ctx.get('expected')}.", param, "invalid_value")
    if kind in ("too_short", "string_too_short"):
        what = "string" if kind == "string_too_short" else "array"
        return (f"Invalid '{param}': empty {what}. Expected {_A[what]} with minimum length "
                f"{ctx.get('min_length')}, but got an empty {what} instead.", param,
                f"empty_{what}")
    if kind in ("too_long", "string_too_long"):
        what = "string" if kind == "string_too_long" else "array"
        return (f"Invalid '{param}': {what} too long. Expected {_A[what]} with maximum length "
                f"{ctx.get('max_length')}.", param, f"{what}_above_max_length")
    return f"Invalid '{param}': {err['msg']}", param, kind if kind in _OURS else "invalid_value"


_A = {"array": "an array", "string": "a string"}
_OURS = ("array_above_max_length", "invalid_value")


def _out_of_range(param: str, kind: str, ctx: dict[str, Any], got: Any) -> tuple[str, str, str]:
    """OpenAI's words for a number out of range; an integer field's limits are ints."""
    limit = next(ctx[k] for k in ("ge", "gt", "le", "lt") if k in ctx)
    number = "integer" if _is_int(limit) else "decimal"
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)
    low = kind.startswith("greater")
    sign = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
            "less_than": "<"}[kind]
    side = "below minimum" if low else "above maximum"
    return (f"Invalid '{param}': {number} {side} value. Expected a value {sign} {limit}, "
            f"but got {_short(got)} instead.", param,
            f"{number}_{'below_min' if low else 'above_max'}_value")
