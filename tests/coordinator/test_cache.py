"""The response cache: which requests are deterministic, LRU, TTL (injected clock)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from coordinator_harness import LOCAL_MODEL, coordinator

from coordinator.cache import CachedResponse, ResponseCache, cache_key
from coordinator.store import Store

CHAT: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 0,
}


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def answer(text: str) -> CachedResponse:
    return CachedResponse(text.encode(), "m", "did:key:z6Mk")


@pytest.mark.parametrize(
    "body",
    [
        {**CHAT, "temperature": 0.7},
        {k: v for k, v in CHAT.items() if k != "temperature"},  # OpenAI's default is 1
        {**CHAT, "stream": True},
        {**CHAT, "n": 2},
        {**CHAT, "temperature": False},
    ],
)
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


# ----------------------------------------------------------------------------- over HTTP


async def test_over_http_a_repeated_deterministic_request_is_served_from_the_cache(
    tmp_path: Path,
) -> None:
    async with coordinator(tmp_path, cache=True) as coord:
        key = coord.key()
        other_key = coord.key("other")
        first = await coord.chat(key, temperature=0)
        second = await coord.chat(key, temperature=0)
        reached_after_two = len(coord.cloud.requests)
        third = await coord.chat(other_key, temperature=0)  # another key: its own entry
        warm = [await coord.chat(key, temperature=0.7) for _ in range(2)]  # not deterministic
        await coord.settled()
        metrics = (await coord.http.get("/metrics")).text
    assert reached_after_two == 1
    assert second.status_code == 200
    assert second.json() == first.json()
    assert second.headers["x-meshgate-cache"] == "hit"
    assert "x-meshgate-cache" not in first.headers
    assert "x-meshgate-cache" not in third.headers
    assert [w.json()["choices"][0]["message"]["content"] for w in warm] == ["answer 3", "answer 4"]
    assert len(coord.cloud.requests) == 4
    assert "meshgate_coordinator_cache_hits_total 1.0" in metrics
    rows = Store(f"sqlite:///{tmp_path / 'coordinator.db'}").usage_rows()
    hit = [r for r in rows if r.outcome == "cache_hit"]
    assert [(r.route, r.cost, r.node_did, r.upstream) for r in hit] == [("cache", 0.0, None, None)]


async def test_over_http_the_cache_is_off_unless_asked_for(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as coord:
        key = coord.key()
        await coord.chat(key, temperature=0)
        again = await coord.chat(key, temperature=0)
    assert "x-meshgate-cache" not in again.headers
    assert len(coord.cloud.requests) == 2


async def test_over_http_a_cached_answer_does_not_reach_the_node_again(tmp_path: Path) -> None:
    async with coordinator(tmp_path, cache=True) as coord:
        node = await coord.node()
        key = coord.key()
        answers = [await coord.chat(key, model=LOCAL_MODEL, temperature=0) for _ in range(3)]
        changed = await coord.chat(key, model=LOCAL_MODEL, temperature=0, content="other")
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].headers["x-meshgate-node"] == node.did
    assert [a.headers.get("x-meshgate-cache") for a in answers] == [None, "hit", "hit"]
    assert {a.json()["choices"][0]["message"]["content"] for a in answers} == {"local 1"}
    assert changed.json()["choices"][0]["message"]["content"] == "local 2"
    assert len(node.requests) == 2
    assert coord.cloud.requests == []
