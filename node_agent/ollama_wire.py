"""OpenAI <-> Ollama, both ways, pure: one option table, no I/O.

Two users: the Ollama routes on the local port (an Ollama request in, an
OpenAI request to whatever runtime serves the model) and the Ollama runtime
(an OpenAI request in, the ``ollama`` client's arguments out, Ollama's answer
back in OpenAI's shapes).

:data:`OPTIONS` is the one table of sampling options: Ollama's name, OpenAI's
(or llama.cpp's) name. ``num_predict`` is ``max_tokens`` (``-1`` and ``-2``
mean no limit on Ollama's side and are dropped), ``stop`` is a string or a
list of strings on the OpenAI side and a list on Ollama's. Ollama's
``format`` ("json" or a JSON schema) is OpenAI's ``response_format``.

Every refusal is an :class:`~meshgate.openai.OpenAIError` 400 naming its
``param``; the Ollama routes answer it in Ollama's ``{"error": ...}`` shape.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from meshgate.openai import OpenAIError

__all__ = [
    "OPTIONS",
    "chat_request",
    "embed_inputs",
    "finish_of",
    "format_of",
    "generate_request",
    "messages_of",
    "ollama_usage",
    "openai_messages",
    "openai_options",
    "options_of",
    "prompt_of",
    "tool_calls_of",
]

#: (Ollama option, OpenAI field): sampling options that pass either way.
OPTIONS: tuple[tuple[str, str], ...] = (
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("min_p", "min_p"),
    ("typical_p", "typical_p"),
    ("repeat_penalty", "repeat_penalty"),
    ("presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty"),
    ("seed", "seed"),
    ("num_predict", "max_tokens"),
    ("stop", "stop"),
)
FINISH = {"stop": "stop", "length": "length"}


def _bad(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, hop="node")


def _stops(value: Any, param: str) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad(f"'{param}' must be a string or a list of strings", param)
    return stops


def _int(value: Any, param: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"'{param}' must be an integer", param)
    return value


# --- Ollama request -> OpenAI request (the Ollama routes) --------------------------------


def openai_options(body: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI sampling fields for an Ollama request's ``options`` and ``format``."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise _bad("'options' must be an object", "options")
    out: dict[str, Any] = {}
    for ollama_name, openai_name in OPTIONS:
        value = options.get(ollama_name)
        if value is None:
            continue
        if ollama_name == "num_predict":
            if _int(value, "options.num_predict") >= 0:  # -1: no limit, -2: fill the context
                out[openai_name] = value
        elif ollama_name == "stop":
            out[openai_name] = _stops(value, "options.stop")
        else:
            out[openai_name] = value
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "format", "schema": fmt},
        }
    elif fmt not in (None, ""):
        raise _bad(f'invalid format {fmt!r}: use "json" or a JSON schema', "format")
    return out


def openai_messages(messages: Any) -> list[dict[str, Any]]:
    """Ollama chat messages as OpenAI's (images as data: URLs, tool calls with JSON arguments)."""
    if not isinstance(messages, list):
        raise _bad("'messages' must be a list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"message {i} must be an object with a role", "messages")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise _bad(f"message {i}: content must be a string", "messages")
        msg: dict[str, Any] = {"role": m["role"], "content": content}
        images = m.get("images") or []
        if images:
            msg["content"] = [{"type": "text", "text": content}] + [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}}
                for img in images
            ]
        calls = m.get("tool_calls")
        if calls:
            msg["tool_calls"] = [
                {
                    "id": f"call_{i}_{j}",
                    "type": "function",
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": json.dumps(c["function"].get("arguments") or {}),
                    },
                }
                for j, c in enumerate(calls)
            ]
        if m["role"] == "tool" and m.get("tool_name"):
            msg["name"] = m["tool_name"]
        out.append(msg)
    return out


def chat_request(body: Mapping[str, Any], model: str, stream: bool) -> dict[str, Any]:
    """The OpenAI ``chat/completions`` request for an Ollama ``/api/chat`` body."""
    req: dict[str, Any] = {
        "model": model,
        "messages": openai_messages(body.get("messages")),
        **openai_options(body),
    }
    if body.get("tools"):
        req["tools"] = body["tools"]
    if stream:
        req["stream"] = True
        req["stream_options"] = {"include_usage": True}
    return req


def generate_request(
    body: Mapping[str, Any], model: str, stream: bool
) -> tuple[str, dict[str, Any]]:
    """The OpenAI endpoint and request for an Ollama ``/api/generate`` body."""
    prompt, system = body.get("prompt") or "", body.get("system") or ""
    if not isinstance(prompt, str) or not isinstance(system, str):
        raise _bad("'prompt' and 'system' must be strings", "prompt")
    req: dict[str, Any] = {"model": model, **openai_options(body)}
    if body.get("raw"):
        endpoint = "completions"
        req["prompt"] = prompt
        if body.get("suffix"):
            req["suffix"] = body["suffix"]
    else:
        endpoint = "chat/completions"
        user = {"role": "user", "content": prompt, "images": body.get("images") or []}
        messages = ([{"role": "system", "content": system}] if system else []) + [user]
        req["messages"] = openai_messages(messages)
    if stream:
        req["stream"] = True
        req["stream_options"] = {"include_usage": True}
    return endpoint, req


# --- OpenAI request -> Ollama client arguments (the Ollama runtime) ----------------------


def options_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """Ollama ``options`` for an OpenAI request's sampling fields."""
    options: dict[str, Any] = {}
    for ollama_name, openai_name in OPTIONS:
        value = body.get(openai_name)
        if openai_name == "max_tokens":
            value = body.get("max_completion_tokens", value)
        if value is None:
            continue
        if openai_name == "max_tokens":
            options[ollama_name] = _int(value, "max_tokens")
        elif openai_name == "stop":
            options[ollama_name] = _stops(value, "stop")
        else:
            options[ollama_name] = value
    n = body.get("n", 1)
    if n not in (1, None):
        raise _bad("the ollama runtime answers with one choice (n=1)", "n")
    return options


def format_of(body: Mapping[str, Any]) -> str | dict[str, Any] | None:
    """Ollama ``format`` for OpenAI's ``response_format``."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return "json"
    if fmt["type"] == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            return schema
    raise _bad(f"unsupported response_format {fmt!r}", "response_format")


def _content(content: Any) -> tuple[str, list[str]]:
    """OpenAI message content (a string or parts) as Ollama's text and base64 images."""
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise _bad("message content must be a string or a list of parts", "messages")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.startswith("data:") or "," not in url:
                raise _bad("the ollama runtime takes images as data: URLs only", "messages")
            images.append(url.split(",", 1)[1])
        else:
            raise _bad(f"unsupported content part {kind!r}", "messages")
    return "".join(texts), images


def messages_of(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI chat messages as Ollama's."""
    out = []
    for m in messages:
        text, images = _content(m.get("content"))
        msg: dict[str, Any] = {"role": m["role"], "content": text}
        if images:
            msg["images"] = images
        calls = m.get("tool_calls")
        if calls:
            msg["tool_calls"] = [
                {
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": _arguments(c["function"].get("arguments")),
                    }
                }
                for c in calls
            ]
        if m["role"] == "tool" and m.get("name"):
            msg["tool_name"] = m["name"]
        out.append(msg)
    return out


def _arguments(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments or "{}")
    except (TypeError, ValueError):
        raise _bad("tool call arguments must be a JSON object", "messages") from None
    if not isinstance(parsed, dict):
        raise _bad("tool call arguments must be a JSON object", "messages")
    return parsed


def prompt_of(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("the ollama runtime takes one prompt string per request", "prompt")
    return prompt


def embed_inputs(body: Mapping[str, Any]) -> list[str]:
    data = body.get("input")
    inputs = [data] if isinstance(data, str) else data
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise _bad("the ollama runtime embeds strings only (not token arrays)", "input")
    return inputs


# --- Ollama answer -> OpenAI answer (the Ollama runtime) ---------------------------------


def ollama_usage(part: Any) -> dict[str, int]:
    """OpenAI usage for an ``ollama`` chat, generate or embed response."""
    prompt = part.prompt_eval_count or 0
    completion = getattr(part, "eval_count", None) or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def tool_calls_of(message: Any, start: int = 0) -> list[dict[str, Any]]:
    """An ``ollama.Message``'s tool calls in OpenAI's shape (arguments a JSON string)."""
    return [
        {
            "index": start + i,
            "id": f"call_{uuid.uuid4().hex[:16]}",
            "type": "function",
            "function": {
                "name": c.function.name,
                "arguments": json.dumps(dict(c.function.arguments)),
            },
        }
        for i, c in enumerate(message.tool_calls or [])
    ]


def finish_of(done_reason: str | None, tool_calls: bool = False) -> str:
    if tool_calls:
        return "tool_calls"
    return FINISH.get(done_reason or "stop", "stop")
