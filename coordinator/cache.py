"""An optional cache of responses to deterministic requests (off unless asked for).

What counts as deterministic, so may be answered from the cache:

- a non-streaming `chat/completions` or `completions` request whose body sets
  `temperature` to 0 explicitly (the OpenAI default is 1) and asks for one
  choice (`n` absent or 1); or any `embeddings` request;
- the cache key is a SHA-256 of the API key's id, the endpoint and the body
  re-serialised canonically (sorted keys, no whitespace), so two keys never
  share an entry (a key's scopes, such as residency labels, can change where
  and how a request runs) and equal bodies written differently still hit.

Only complete 200 answers are stored. Entries live in memory, at most
`max_entries` (least recently used goes first) and at most `ttl_s` seconds.
The clock is injected for tests.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_TTL_S = 300.0
DEFAULT_MAX_ENTRIES = 1024


def cache_key(key_id: str, endpoint: str, body: Mapping[str, Any]) -> str | None:
    """The cache key of a request, or None when the request is not deterministic."""
    if body.get("stream"):
        return None
    if endpoint != "embeddings":
        temperature = body.get("temperature")
        if isinstance(temperature, bool) or temperature not in (0, 0.0):
            return None
        if body.get("n", 1) != 1:
            return None
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256()
    for part in (key_id, endpoint, canonical):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class CachedResponse:
    body: bytes
    model: str
    served_by: str  # the node did or upstream that made the answer first
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ResponseCache:
    def __init__(
        self,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or max_entries <= 0:
            raise ValueError("a response cache needs a positive ttl and size")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, CachedResponse]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedResponse | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] <= self._clock():
                if entry is not None:
                    del self._entries[key]
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]

    def put(self, key: str, response: CachedResponse) -> None:
        with self._lock:
            self._entries[key] = (self._clock() + self.ttl_s, response)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
