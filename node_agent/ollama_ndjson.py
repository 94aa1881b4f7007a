"""OpenAI answers as Ollama's: the NDJSON objects of ``/api/chat`` and ``/api/generate`` (pure).

:class:`Translator` turns OpenAI stream chunks (or one whole OpenAI answer)
into Ollama's objects: text pieces with ``done: false``, streamed tool calls
collected and sent whole, and the last object with ``done``, ``done_reason``,
``prompt_eval_count``, ``eval_count`` and durations in nanoseconds.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

__all__ = ["DONE_REASON", "Translator", "line", "now_iso"]

DONE_REASON = {"stop": "stop", "length": "length", "tool_calls": "stop", "content_filter": "stop"}


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def line(obj: dict[str, Any]) -> bytes:
    """One NDJSON line."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    out = []
    for c in calls or []:
        fn = c.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = {"_raw": fn.get("arguments")}
        out.append({"function": {"name": fn.get("name", ""), "arguments": args}})
    return out


class Translator:
    """OpenAI chunks (or one OpenAI answer) as Ollama's NDJSON objects, with timings."""

    def __init__(self, model: str, *, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.started = time.monotonic_ns()
        self.first_at: int | None = None
        self.reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.pieces = 0
        self.calls: dict[int, dict[str, str]] = {}  # streamed tool calls: index -> name, args

    def _object(self, text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": now_iso()}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
            if calls:
                out["message"]["tool_calls"] = calls
        else:
            out["response"] = text
        return out

    def chunk(self, payload: bytes) -> dict[str, Any] | None:
        """The Ollama object for one OpenAI stream chunk, if it carries text.

        Tool calls arrive in pieces (the name, then the arguments a few
        characters at a time); they are collected and sent whole by
        :meth:`tool_calls` before the last object.
        """
        data = json.loads(payload)
        if isinstance(data.get("usage"), dict):
            self.usage = data["usage"]
        text = ""
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            text += delta.get("content") or choice.get("text") or ""
            for call in delta.get("tool_calls") or []:
                index = call.get("index", len(self.calls))
                slot = self.calls.setdefault(index, {"name": "", "arguments": ""})
                fn = call.get("function") or {}
                slot["name"] = slot["name"] or fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
            self.reason = choice.get("finish_reason") or self.reason
        if not text:
            return None
        self.first_at = self.first_at or time.monotonic_ns()
        self.pieces += 1
        return {**self._object(text), "done": False}

    def tool_calls(self) -> dict[str, Any] | None:
        """The object carrying the streamed tool calls, whole, if there were any."""
        if not self.calls:
            return None
        calls = [{"function": self.calls[i]} for i in sorted(self.calls)]
        return {**self._object("", _tool_calls(calls)), "done": False}

    def final(self, text: str = "", calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The last object: ``done``, ``done_reason``, token counts and durations."""
        end = time.monotonic_ns()
        first = self.first_at or end
        out = self._object(text, calls)
        out.update(
            {
                "done": True,
                "done_reason": DONE_REASON.get(self.reason or "stop", "stop"),
                "total_duration": end - self.started,
                "load_duration": 0,
                "prompt_eval_count": int(self.usage.get("prompt_tokens") or 0),
                "prompt_eval_duration": first - self.started,
                "eval_count": int(self.usage.get("completion_tokens") or self.pieces),
                "eval_duration": end - first,
            }
        )
        return out

    def whole(self, payload: bytes) -> dict[str, Any]:
        """The Ollama answer for one non-streamed OpenAI answer."""
        data = json.loads(payload)
        self.usage = data.get("usage") or {}
        choice = (data.get("choices") or [{}])[0]
        self.reason = choice.get("finish_reason")
        message = choice.get("message") or {}
        text = message.get("content") or choice.get("text") or ""
        self.first_at = self.started
        return self.final(text, _tool_calls(message.get("tool_calls")))
