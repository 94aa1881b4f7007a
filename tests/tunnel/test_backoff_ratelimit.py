"""Pure helpers: full-jitter backoff and per-source token buckets."""

from __future__ import annotations

import random
from itertools import islice

from tunnel.backoff import backoff, retryable
from tunnel.errors import ClosedError, RefusedError, TunnelError
from tunnel.ratelimit import SourceLimiter, TokenBucket


def test_backoff_delays_are_full_jitter_under_a_growing_capped_ceiling() -> None:
    delays = list(islice(backoff(0.5, 30.0, 2.0, rng=random.Random(7)), 20))
    ceilings = [min(30.0, 0.5 * 2**n) for n in range(20)]
    assert all(0.0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays[10:]) > 4.0  # the ceiling really grew
    assert max(delays) <= 30.0


def test_backoff_is_deterministic_for_a_seeded_rng() -> None:
    first = list(islice(backoff(rng=random.Random(1)), 5))
    assert first == list(islice(backoff(rng=random.Random(1)), 5))


def test_refusals_are_final_and_everything_else_is_retried() -> None:
    assert not retryable(RefusedError(403, "revoked"))
    assert retryable(ClosedError("lost"))
    assert retryable(TunnelError("timeout"))
    assert retryable(OSError("unreachable"))


def test_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=20.0, burst=40.0, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(100)) == 40
    assert not bucket.take(0.0)
    assert sum(bucket.take(1.0) for _ in range(100)) == 20
    assert bucket.full(10.0)


def test_limiter_keeps_sources_apart() -> None:
    limiter = SourceLimiter(rate=1.0, burst=2.0)
    assert [limiter.allow("a", 0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow("b", 0.0)
    assert limiter.allow("a", 1.0)


def test_limiter_memory_is_bounded() -> None:
    limiter = SourceLimiter(rate=1.0, burst=2.0, max_sources=100)
    for n in range(1000):
        limiter.allow(f"10.0.{n // 256}.{n % 256}", 0.0)
    assert len(limiter) <= 100
    for n in range(1000):
        limiter.allow(f"10.1.{n // 256}.{n % 256}", 100.0 + n)  # idle buckets are dropped
    assert len(limiter) <= 100
