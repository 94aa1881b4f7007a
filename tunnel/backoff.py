"""Retry as data: a generator of full-jitter delays and a "retry at all?" check.

The reconnect loop only sleeps; what to wait and whether to try again is
decided here (as websockets' client.backoff). Full jitter: the n-th delay is
uniform in [0, min(cap, initial * factor**n)] (AWS architecture blog,
"Exponential Backoff And Jitter").
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from tunnel.errors import RefusedError


def backoff(
    initial: float = 0.5,
    cap: float = 30.0,
    factor: float = 2.0,
    *,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Endless delays in seconds; make a new one to reset after a stable connection."""
    draw = rng or random.Random()  # noqa: S311 (jitter, not cryptography)
    ceiling = initial
    while True:
        yield draw.uniform(0.0, ceiling)
        ceiling = min(cap, ceiling * factor)


def retryable(exc: BaseException) -> bool:
    """A refusal (HTTP 401/403: revoked, unknown, bad token) is final; the rest may pass."""
    return not isinstance(exc, RefusedError)
