"""The FAKE Ollama server's model of the world (tests/node/fake_ollama_server.py): its models,
Ollama's keep-alive durations, canned words, deterministic embeddings and the request
checks Ollama makes on options and tools."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

CANNED = ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "."]
EMBED_DIM = 8
TOOL_ARGUMENTS = {"city": "Paris", "days": 3}
TOOL_CALL_TOKENS = 12
DEFAULT_KEEP_ALIVE = 300.0
FOREVER = datetime(2318, 1, 1, tzinfo=UTC)  # what Ollama shows for keep_alive -1
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class OllamaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class FakeModel:
    name: str
    capability: str  # "completion" | "embedding"
    modified_at: str = "2025-01-01T00:00:00Z"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def size(self) -> int:
        return 100_000_000 + len(self.name) * 1_000_000

    @property
    def family(self) -> str:
        return "bert" if self.capability == "embedding" else "llama"

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": "135M",
            "quantization_level": "Q4_K_M",
        }


def full_name(name: str) -> str:
    """Ollama's name for `name`: a missing tag is ``latest``."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def parse_keep_alive(value: Any) -> float | None:
    """Seconds to stay loaded (``None``: forever; 0: unload now), as Ollama reads it."""
    if value is None:
        return DEFAULT_KEEP_ALIVE
    if isinstance(value, bool):
        raise OllamaError(400, f"invalid keep_alive {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise OllamaError(400, f'time: invalid duration "{value}"') from None
            seconds = sign * sum(float(n) * _UNIT[u] for n, u in parts)
    else:
        raise OllamaError(400, f"invalid keep_alive {value!r}")
    return None if seconds < 0 else seconds


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def embedding(text: str, dims: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(b - 127.5) / 127.5 for b in digest[:dims]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def word_count(text: str) -> int:
    return len(text.split())


def request_options(data: dict[str, Any]) -> dict[str, Any]:
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise OllamaError(400, "options must be an object")
    for key in ("num_predict", "seed", "num_ctx", "top_k"):
        if key in options and not isinstance(options[key], int):
            raise OllamaError(400, f"option {key} must be an integer")
    for key in ("temperature", "top_p"):
        if key in options and not isinstance(options[key], int | float):
            raise OllamaError(400, f"option {key} must be a number")
    stop = options.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise OllamaError(400, "option stop must be a list of strings")
    return {**options, "stop": stop}

def tool_calls(data: dict[str, Any]) -> list[dict[str, Any]]:
    """A call of the first tool, when tools are offered and the user spoke last."""
    tools, messages = data.get("tools") or [], data.get("messages") or []
    if not tools or not messages or messages[-1].get("role") != "user":
        return []
    name = (tools[0].get("function") or {}).get("name")
    if not isinstance(name, str):
        raise OllamaError(400, "each tool needs a function name")
    return [{"function": {"name": name, "arguments": TOOL_ARGUMENTS}}]

def canned_pieces(options: dict[str, Any]) -> tuple[list[str], str]:
    """The canned words this request gets, and why they end."""
    limit = options.get("num_predict")
    out: list[str] = []
    for i, word in enumerate(CANNED):
        if word in options["stop"]:
            return out, "stop"
        if isinstance(limit, int) and 0 <= limit <= len(out):
            return out, "length"
        out.append(word if i == 0 else " " + word)
    return out, "stop"
