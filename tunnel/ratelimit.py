"""Token buckets, pure: the caller passes the time. Used to rate-limit handshakes
per source address before any Diffie-Hellman work is done; `IdentityLimiter`
admits known identities past their address's limit (a site of 1,000 nodes
behind one NAT address reconnecting after a restart), with the extra DH work
bounded by one shared bucket and each identity by its own."""

from __future__ import annotations


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        self.refill(now)
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True

    def full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.burst


class SourceLimiter:
    """One bucket per source (e.g. IP address), with a bound on how many are kept."""

    def __init__(self, rate: float = 20.0, burst: float = 40.0, max_sources: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, source: str, now: float) -> bool:
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._forget_idle(now)
            bucket = self._buckets[source] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def _forget_idle(self, now: float) -> None:
        """Full buckets carry no memory worth keeping; if none is full, start over."""
        self._buckets = {s: b for s, b in self._buckets.items() if not b.full(now)}
        if len(self._buckets) >= self.max_sources:
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)


class IdentityLimiter:
    """Handshakes past the source limit: a shared bucket bounds the DH work done to learn
    who is asking; then each known identity gets its own small bucket."""

    def __init__(self, shared_rate: float = 200.0, shared_burst: float = 400.0,
                 per_identity_rate: float = 0.5, per_identity_burst: float = 2.0,
                 max_identities: int = 100_000) -> None:
        self.shared = TokenBucket(shared_rate, shared_burst, 0.0)
        self.identities = SourceLimiter(per_identity_rate, per_identity_burst, max_identities)
        self._primed = False

    def may_try(self, now: float) -> bool:
        """Whether one more handshake past its source's limit may be read (costs a DH)."""
        if not self._primed:
            self.shared.updated, self._primed = now, True
        return self.shared.take(now)

    def allow(self, identity: str, now: float) -> bool:
        return self.identities.allow(identity, now)
