"""The response cache: which requests are deterministic, LRU, TTL (injected clock)."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.cache import CachedResponse, ResponseCache, cache_key

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                        "temperature": 0}


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def answer(text: str) -> CachedResponse:
    return CachedResponse(text.encode(), "m", "did:key:z6Mk")


@pytest.mark.parametrize("body", [
    {**CHAT, "temperature": 0.7},
    {k: v for k, v in CHAT.items() if k != "temperature"},  # OpenAI's default is 1
    {**CHAT, "stream": True},
    {**CHAT, "n": 2},
    {**CHAT, "temperature": False},
])
def test_only_deterministic_requests_have_a_cache_key(body: dict[str, Any]) -> None:
    assert cache_key("k", "chat/completions", body) is None


def test_the_key_ignores_json_layout_but_not_the_api_key_or_endpoint() -> None:
    same = {"temperature": 0, "messages": CHAT["messages"], "model": "m"}
    key = cache_key("k", "chat/completions", CHAT)
    assert key is not None
    assert cache_key("k", "chat/completions", same) == key
    assert cache_key("other", "chat/completions", CHAT) != key
    assert cache_key("k", "completions", CHAT) != key
    assert cache_key("k", "chat/completions", {**CHAT, "max_tokens": 5}) != key
    assert cache_key("k", "embeddings", {"model": "m", "input": "x"}) is not None


def test_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    cache = ResponseCache(ttl_s=10, clock=clock)
    cache.put("a", answer("1"))
    clock.t = 9.9
    assert cache.get("a") == answer("1")
    clock.t = 10.0
    assert cache.get("a") is None
    assert len(cache) == 0
    assert (cache.hits, cache.misses) == (1, 1)


def test_the_least_recently_used_entry_goes_first() -> None:
    cache = ResponseCache(max_entries=2, clock=Clock())
    cache.put("a", answer("1"))
    cache.put("b", answer("2"))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", answer("3"))
    assert cache.get("b") is None
    assert cache.get("a") is not None
    assert cache.get("c") is not None


def test_a_cache_needs_a_positive_size_and_ttl() -> None:
    with pytest.raises(ValueError, match="positive"):
        ResponseCache(ttl_s=0)
