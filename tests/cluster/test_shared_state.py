"""Shared fast state on a real redis-server: the same rules as one coordinator's memory,
shared by replicas, and the decided behaviour while Redis is down."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.cache import CachedResponse, ResponseCache
from coordinator.cluster import Cluster
from coordinator.limits import Ask, Buckets, LocalBuckets, RateLimited, RateLimiter
from coordinator.registry import Registry
from coordinator.shared_state import RedisBuckets, RedisLink, SharedResponseCache
from coordinator.store import Store
from tests.cluster.engines import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.proc is None:
        redis_server.start()
    link = RedisLink(redis_server.url)
    link.client.flushdb()
    link.close()
    return redis_server.url


def _buckets(kind: str, url: str) -> Buckets:
    return LocalBuckets() if kind == "local" else RedisBuckets(RedisLink(url))


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_both_bucket_stores_obey_the_same_rules(kind: str, redis_url: str) -> None:
    limiter = RateLimiter(buckets=_buckets(kind, redis_url))
    for _ in range(3):
        limiter.admit("k", rpm=3, tpm=None, tokens=1)
    with pytest.raises(RateLimited) as caught:
        limiter.admit("k", rpm=3, tpm=None, tokens=1)
    assert caught.value.limit == "requests"
    assert 19 <= caught.value.retry_after <= 20  # one request in 20 s at 3 a minute
    # tokens refuse: the requests bucket must not be charged for a refused request
    limiter.admit("t", rpm=2, tpm=100, tokens=100)
    with pytest.raises(RateLimited) as caught:
        limiter.admit("t", rpm=2, tpm=100, tokens=50)
    assert caught.value.limit == "tokens"
    limiter.adjust("t", -100)  # the request used nothing: all back
    limiter.admit("t", rpm=2, tpm=100, tokens=50)  # the second request slot was still free
    with pytest.raises(RateLimited):
        limiter.admit("t", rpm=2, tpm=100, tokens=1)


def test_three_replicas_share_one_rpm(redis_url: str) -> None:
    replicas = [RateLimiter(buckets=RedisBuckets(RedisLink(redis_url))) for _ in range(3)]
    started = time.monotonic()
    admitted = refused = 0
    for i in range(180):
        try:
            replicas[i % 3].admit("shared", rpm=60, tpm=None, tokens=0)
            admitted += 1
        except RateLimited:
            refused += 1
    refill = int(time.monotonic() - started)  # 60 a minute is one a second
    assert 60 <= admitted <= 60 + refill, (admitted, refill)
    assert refused == 180 - admitted


def test_redis_down_falls_back_to_local_buckets_loudly(
    redis_server: RedisServer, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [0.0]
    link = RedisLink(redis_url, clock=lambda: clock[0])
    limiter = RateLimiter(buckets=RedisBuckets(link))
    limiter.admit("k", rpm=2, tpm=None, tokens=0)
    redis_server.stop()
    with caplog.at_level(logging.ERROR, logger="coordinator.shared_state"):
        limiter.admit("k", rpm=2, tpm=None, tokens=0)  # local bucket: full, 2 a minute
        limiter.admit("k", rpm=2, tpm=None, tokens=0)
        with pytest.raises(RateLimited):
            limiter.admit("k", rpm=2, tpm=None, tokens=0)  # the local limit still holds
    down = [r for r in caplog.records if "REDIS DOWN" in r.getMessage()]
    assert len(down) == 1, "one loud line per outage, not one per request"
    assert not link.up
    assert link.fallbacks == 3
    redis_server.start()
    clock[0] += 2.0  # past RETRY_S: Redis is tried again
    with caplog.at_level(logging.WARNING, logger="coordinator.shared_state"):
        # a Redis restarted without persistence starts every bucket full (documented)
        limiter.admit("k", rpm=2, tpm=None, tokens=0)
        limiter.admit("k", rpm=2, tpm=None, tokens=0)
        with pytest.raises(RateLimited):
            limiter.admit("k", rpm=2, tpm=None, tokens=0)
    assert link.up
    assert link.client.exists("meshgate:rl:{k}:requests:2")
    assert any("redis is back" in r.getMessage() for r in caplog.records)


def test_a_cached_answer_from_one_replica_is_served_by_another(redis_url: str) -> None:
    one = SharedResponseCache(RedisLink(redis_url), ttl_s=30, max_entries=10)
    two = SharedResponseCache(RedisLink(redis_url), ttl_s=30, max_entries=10)
    answer = CachedResponse(b'{"id":"x"}', "smollm2", "did:key:z6Mk", 5, 7)
    assert two.get("k1") is None
    one.put("k1", answer)
    assert two.get("k1") == answer
    assert (two.hits, two.misses) == (1, 1)
    ttl_ms = RedisLink(redis_url).client.pttl("meshgate:cache:k1")
    assert 0 < int(ttl_ms) <= 30_000  # type: ignore[arg-type]


def test_the_cache_keeps_working_in_memory_while_redis_is_down(
    redis_server: RedisServer, redis_url: str
) -> None:
    cache = SharedResponseCache(RedisLink(redis_url), ttl_s=30, max_entries=10)
    redis_server.stop()
    answer = CachedResponse(b"{}", "m", "n")
    cache.put("k", answer)
    assert cache.get("k") == answer
    assert isinstance(cache, ResponseCache)


async def test_events_reach_the_other_replicas(tmp_path: Path, redis_url: str) -> None:
    stores = [Store(f"sqlite:///{tmp_path / 'db'}") for _ in range(2)]
    clusters = [Cluster(s, RedisLink(redis_url), Registry()) for s in stores]
    for i, cluster in enumerate(clusters):
        await cluster.join(f"ws://r{i}", f"http://r{i}")
    forgotten = [asyncio.Event(), asyncio.Event()]
    closed: list[int] = []

    async def close(i: int) -> list[str]:
        closed.append(i)
        return []

    from coordinator.cluster import SharedBudgets

    budgets = []
    tasks = []
    for i, cluster in enumerate(clusters):
        cluster.budgets = SharedBudgets(stores[i].spend_by_key, cluster.publish_spend)
        budgets.append(cluster.budgets)
        tasks += cluster.start(forgotten[i].set, lambda i=i: close(i))  # type: ignore[misc]
    try:
        async with asyncio.timeout(10):  # subscribed: the resync after subscribing ran
            await forgotten[0].wait()
            await forgotten[1].wait()
        forgotten[1].clear()
        await asyncio.to_thread(budgets[1].refresh)  # read from the ledger once
        assert budgets[1].status("key-a").spent_day == 0.0
        clusters[0].publish("keys")
        async with asyncio.timeout(5):
            await forgotten[1].wait()
        clusters[1].event.clear()
        clusters[0].budgets.add("key-a", 0.25)  # type: ignore[union-attr]
        async with asyncio.timeout(5):
            await clusters[1].event.wait()
        assert budgets[1].status("key-a").spent_day == pytest.approx(0.25)
        await clusters[0].heartbeat_once()  # r0 joined first: it learns r1 at a heartbeat
        assert sorted(clusters[0].member_urls) == sorted(clusters[1].member_urls) == [
            "ws://r0", "ws://r1"]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for cluster in clusters:
            await cluster.stop()
        for store in stores:
            store.close()


def test_a_replica_that_left_is_no_member(tmp_path: Path, redis_url: str) -> None:
    async def scenario() -> list[str]:
        store = Store(f"sqlite:///{tmp_path / 'db'}")
        a, b = Cluster(store, RedisLink(redis_url), Registry()), Cluster(
            store, RedisLink(redis_url), Registry())
        await a.join("ws://a", "http://a")
        await b.join("ws://b", "http://b")
        await b.stop()
        await a.heartbeat_once()
        await a.stop()
        store.close()
        return a.member_urls

    assert asyncio.run(scenario()) == ["ws://a"]


def test_asks_are_plain_values() -> None:
    assert Ask("requests", 60, 1) == Ask("requests", 60, 1)


def test_live_views_of_the_replicas_merge() -> None:
    from coordinator.cluster import merge_live

    views = {
        "ws://a": {"nodes": {"n1": {"in_flight": 2, "telemetry_age_s": 3.0, "rtt_ms": 1},
                             "n2": {"in_flight": 0, "telemetry_age_s": 0.5}}},
        "ws://b": {"nodes": {"n1": {"in_flight": 1, "telemetry_age_s": 0.2, "rtt_ms": 9}}},
        "ws://c": {"nodes": "garbage"},
    }
    merged = merge_live(views)
    assert merged["n1"] == {"in_flight": 3, "telemetry_age_s": 0.2, "rtt_ms": 9,
                            "replicas": ["ws://a", "ws://b"]}
    assert merged["n2"]["replicas"] == ["ws://a"]
