"""The fast state replicas share, on Redis: rate-limit buckets, the response cache, budget
spend between ledger reads, and events (revocations, spend) pushed to every replica.

One coordinator keeps all of this in memory (`limits.LocalBuckets`, `cache.ResponseCache`,
`metering.BudgetTracker`); the classes here are the same objects with Redis underneath,
not a second copy of their rules:

- `RedisBuckets` runs `TokenBucket`'s arithmetic in one Lua script per admission (all of a
  key's buckets checked and taken atomically, Redis's own clock, so replicas agree);
- `SharedResponseCache` is a `ResponseCache` whose entries live in Redis with a TTL
  (`SET ... PX`), so an answer cached by one replica is served by every other;
- budget spend is pushed to every replica on the events channel (`cluster.py`), on top
  of each replica's periodic read of the ledger in PostgreSQL.

Redis down (decided, see coordinator/CLUSTER.md): nothing waits for it. Every call has a
short timeout; the first failure logs one loud line, and for `RETRY_S` after it calls go
straight to the local fallback (each replica's own buckets, so a key may get up to N times
its rate while Redis is down; cache misses; spend from the ledger only), then Redis is
tried again and its return is logged with how many calls fell back.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack

from coordinator.cache import CachedResponse, ResponseCache
from coordinator.engines import redis_module
from coordinator.limits import Ask, LocalBuckets

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT_S = 0.25
"""A Redis call slower than this counts as Redis down (loopback round trips are ~0.1 ms)."""
RETRY_S = 1.0
"""After a failure, calls use the local fallback this long before Redis is tried again."""
PREFIX = "meshgate:"

# KEYS: the buckets; ARGV: per bucket its per-minute rate and amount, then the mode:
# "all" takes every amount if every bucket has room (else nothing: returns the longest
# wait and its index), "adjust" takes (or gives back, if negative) without refusing.
# The arithmetic is TokenBucket's: refill at rate/60 a second up to a minute's worth.
BUCKETS_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local mode = ARGV[#ARGV]
local state = {}
local worst, which = 0, 0
for i = 1, #KEYS do
  local cap = tonumber(ARGV[2 * i - 1])
  local rate = cap / 60.0
  local amount = tonumber(ARGV[2 * i])
  local held = redis.call('HMGET', KEYS[i], 'level', 'at')
  local level = tonumber(held[1]) or cap
  local at = tonumber(held[2]) or now
  if now > at then
    level = math.min(cap, level + (now - at) * rate)
    at = now
  end
  if mode == 'adjust' then
    if amount > 0 then level = level - amount else level = math.min(cap, level - amount) end
  else
    local need = math.min(amount, cap)
    if level < need and (need - level) / rate > worst then
      worst, which = (need - level) / rate, i
    end
  end
  state[i] = {level, at, cap, rate, amount}
end
if worst > 0 then return {tostring(worst), which - 1} end
for i = 1, #KEYS do
  local level, at, cap, rate, amount = unpack(state[i])
  if mode ~= 'adjust' then level = level - amount end
  redis.call('HSET', KEYS[i], 'level', tostring(level), 'at', tostring(at))
  redis.call('EXPIRE', KEYS[i], math.ceil((cap - level) / rate) + 60)
end
return {'0', -1}
"""


class RedisLink:
    """One redis-py client with short timeouts, and the outage policy for every caller."""

    def __init__(self, url: str, *, timeout: float = TIMEOUT_S, retry_s: float = RETRY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        redis = redis_module()
        self.url = url
        self.client: Redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            health_check_interval=0)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._retry_s = retry_s
        self._clock = clock
        self._down_until: float | None = None
        self.fallbacks = 0
        """calls answered by the local fallback during the current (or last) outage"""

    @property
    def up(self) -> bool:
        return self._down_until is None

    def call(self, what: str, work: Callable[[Redis], T], fallback: Callable[[], T]) -> T:
        """`work(client)`, or `fallback()` while Redis is down (logged once per outage)."""
        if self._down_until is not None and self._clock() < self._down_until:
            self.fallbacks += 1
            return fallback()
        try:
            result = work(self.client)
        except self._errors as exc:
            if self._down_until is None:
                self.fallbacks = 0
                log.error(
                    "REDIS DOWN (%s): %s failed: %s. Until it is back, each replica uses its "
                    "own rate-limit buckets (a key may get up to one rate per replica), the "
                    "response cache misses and budgets count only the ledger; retrying "
                    "every %g s", _safe(self.url), what, exc, self._retry_s)
            self._down_until = self._clock() + self._retry_s
            self.fallbacks += 1
            return fallback()
        if self._down_until is not None:
            log.warning("redis is back at %s; %d call(s) used the local fallback meanwhile",
                        _safe(self.url), self.fallbacks)
            self._down_until = None
        return result

    def close(self) -> None:
        self.client.close()


def _safe(url: str) -> str:
    """The URL without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


class RedisBuckets:
    """Every replica's buckets in Redis (`limits.Buckets`); this replica's own while down."""

    def __init__(self, link: RedisLink, local: LocalBuckets | None = None) -> None:
        self.link = link
        self.local = local if local is not None else LocalBuckets(time.monotonic)
        self._script = link.client.register_script(BUCKETS_LUA)

    @staticmethod
    def _keys(key_id: str, asks: Sequence[Ask]) -> list[str]:
        # {key_id} keeps one key's buckets in one Redis Cluster slot (one script touches all)
        return [f"{PREFIX}rl:{{{key_id}}}:{a.kind}:{a.per_minute}" for a in asks]

    @staticmethod
    def _args(asks: Sequence[Ask], mode: str) -> list[str]:
        out: list[str] = []
        for ask in asks:
            out += [str(ask.per_minute), repr(float(ask.amount))]
        return [*out, mode]

    def take_all(self, key_id: str, asks: Sequence[Ask]) -> tuple[float, int]:
        def work(_client: Redis) -> tuple[float, int]:
            wait, which = self._script(keys=self._keys(key_id, asks),
                                       args=self._args(asks, "all"))
            return float(wait), int(which)

        return self.link.call("a rate-limit check", work,
                              lambda: self.local.take_all(key_id, asks))

    def adjust(self, key_id: str, ask: Ask) -> None:
        def work(_client: Redis) -> None:
            self._script(keys=self._keys(key_id, [ask]), args=self._args([ask], "adjust"))

        self.link.call("a rate-limit adjustment", work, lambda: self.local.adjust(key_id, ask))


class SharedResponseCache(ResponseCache):
    """A `ResponseCache` whose entries live in Redis (TTL by `SET PX`; size by Redis's own
    maxmemory policy); while Redis is down, this replica's memory, as one coordinator."""

    def __init__(self, link: RedisLink, *, ttl_s: float, max_entries: int) -> None:
        super().__init__(ttl_s=ttl_s, max_entries=max_entries)
        self.link = link

    def get(self, key: str) -> CachedResponse | None:
        def work(client: Redis) -> CachedResponse | None:
            raw: Any = client.get(f"{PREFIX}cache:{key}")
            if raw is None:
                self.misses += 1
                return None
            self.hits += 1
            return _unpack(raw)

        return self.link.call("a cache read", work, lambda: super(SharedResponseCache, self)
                              .get(key))

    def put(self, key: str, response: CachedResponse) -> None:
        packed = msgpack.packb([response.body, response.model, response.served_by,
                                response.prompt_tokens, response.completion_tokens])

        def work(client: Redis) -> None:
            client.set(f"{PREFIX}cache:{key}", packed, px=max(1, math.ceil(self.ttl_s * 1000)))

        self.link.call("a cache write", work,
                       lambda: super(SharedResponseCache, self).put(key, response))


def _unpack(raw: bytes) -> CachedResponse | None:
    try:
        body, model, served_by, prompt, completion = msgpack.unpackb(raw)
        return CachedResponse(bytes(body), str(model), str(served_by), int(prompt),
                              int(completion))
    except (ValueError, TypeError, msgpack.UnpackException):
        log.warning("a cached answer in redis is unreadable; treating it as a miss")
        return None
