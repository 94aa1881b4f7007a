"""What the FAKE Ollama server (tests/node/fake_ollama_server.py) answers to /api/chat and
/api/generate: the prompt's text as checked from the request, the load/unload answer
to an empty turn, and the NDJSON objects of an answer (its pieces and the last one,
with Ollama's counts and durations)."""

from __future__ import annotations

import time
from typing import Any

from tests.node.fake_ollama_model import TOOL_CALL_TOKENS, OllamaError, now_iso

__all__ = ["Reply", "load_reply", "turn_text"]


def turn_text(data: dict[str, Any], *, chat: bool) -> tuple[str, bool]:
    """The turn's text (for the prompt count) and whether it is empty (load/unload only),
    refusing the shapes Ollama refuses."""
    if chat:
        messages = data.get("messages") or []
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
        ):
            raise OllamaError(400, "messages must be a list of objects with a role")
        return " ".join(str(m.get("content") or "") for m in messages), not messages
    prompt = data.get("prompt") or ""
    if not isinstance(prompt, str):
        raise OllamaError(400, "prompt must be a string")
    return f"{data.get('system') or ''} {prompt}", not prompt


def load_reply(data: dict[str, Any], name: str, *, chat: bool, unloaded: bool) -> dict[str, Any]:
    """The answer to an empty turn: the model was loaded (or, with keep_alive 0, unloaded)."""
    reply: dict[str, Any] = {"model": data.get("model", name), "created_at": now_iso()}
    if chat:
        reply["message"] = {"role": "assistant", "content": ""}
        reply["done_reason"] = "unload" if unloaded else "load"
    else:
        reply["response"] = ""
        if unloaded:
            reply["done_reason"] = "unload"
    reply["done"] = True
    return reply


class Reply:
    """The objects of one answer: :meth:`chunk` per piece, :meth:`last` with the counts."""

    def __init__(self, data: dict[str, Any], name: str, *, chat: bool,
                 calls: list[dict[str, Any]], words: list[str], reason: str,
                 prompt_tokens: int, started: int) -> None:
        self.data, self.chat, self.calls, self.words = data, chat, calls, words
        self.reason, self.prompt_tokens, self.started = reason, prompt_tokens, started
        self.head = {"model": data.get("model", name)}

    def chunk(self, piece: str, with_calls: bool = False) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": piece}
            if with_calls:
                message["tool_calls"] = self.calls
            return {**self.head, "created_at": now_iso(), "message": message, "done": False}
        return {**self.head, "created_at": now_iso(), "response": piece, "done": False}

    def last(self, content: str) -> dict[str, Any]:
        total = time.monotonic_ns() - self.started
        final = self.chunk(content)
        final.update(
            {
                "done": True,
                "done_reason": self.reason,
                "total_duration": total,
                "load_duration": 1000,
                "prompt_eval_count": self.prompt_tokens,
                "prompt_eval_duration": total // 3,
                "eval_count": len(self.words) or (TOOL_CALL_TOKENS if self.calls else 0),
                "eval_duration": total // 2,
            }
        )
        if not self.chat and not self.data.get("raw"):
            final["context"] = list(range(1, self.prompt_tokens + len(self.words) + 1))
        return final
