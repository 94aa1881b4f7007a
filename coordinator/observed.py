"""What the coordinator measured of one model on one node, trusted over the node's claims.

A node reports its own prefill and decode rates; a node can be wrong or lie
(issue 9: one claiming 1e300 tok/s that never answered was always picked).
The coordinator times every request it sends: seconds to the first token and
completion tokens per second after it. Once it has a decode rate of its own,
the scheduler's view uses it instead of the claim, and the first-token
timeout follows the measured first-token time instead of a fixed 60 s.
"""

from __future__ import annotations

from dataclasses import dataclass

ALPHA = 0.3  # weight of the newest sample in the moving averages
TIMEOUT_FLOOR_S = 10.0  # never give up on a first token sooner than this
TIMEOUT_FACTOR = 4.0  # ... nor sooner than this many times what we expect


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + ALPHA * (new - old)


@dataclass(slots=True)
class Observed:
    ttft_s: float | None = None  # moving average: request sent -> first token
    prefill: float | None = None  # prompt tokens / ttft (a lower bound: it includes the trip)
    decode: float | None = None  # completion tokens / seconds after the first token
    answered: int = 0

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        self.answered += 1
        self.ttft_s = _ewma(self.ttft_s, max(seconds, 0.0))
        if prompt_tokens > 0 and seconds > 0:
            self.prefill = _ewma(self.prefill, prompt_tokens / seconds)

    def finished(self, completion_tokens: int, seconds_after_first: float) -> None:
        if completion_tokens > 1 and seconds_after_first > 0:
            self.decode = _ewma(self.decode, (completion_tokens - 1) / seconds_after_first)

    def decode_tps(self, claimed: float) -> float:
        return self.decode if self.decode is not None else claimed

    def prefill_tps(self, claimed: float) -> float:
        return self.prefill if self.prefill is not None else claimed


def first_token_timeout(ceiling: float, seen: Observed | None, load_s: float = 0.0,
                        ahead: int = 0) -> float:
    """How long to wait for a first token: until measured, `ceiling` (the configured
    timeout); then a few times the measured time (plus a load the node must do first), at
    least TIMEOUT_FLOOR_S, at most `ceiling`. `ahead` requests that the node runs or holds
    before this one (its slots are full) each get as long again: a request waiting its turn
    behind others is not a node that stopped answering."""
    if seen is None or seen.ttft_s is None:
        one = ceiling
    else:
        expected = TIMEOUT_FACTOR * seen.ttft_s + max(load_s, 0.0)
        one = min(ceiling, max(TIMEOUT_FLOOR_S, expected))
    return one * (1 + max(ahead, 0))


def requests_ahead(in_flight: int, capacity: int | None) -> int:
    """How many of our requests a node finishes before it starts one more, when
    `in_flight` of ours (that one included) are on it and it runs `capacity` at once (None:
    1; 0: not capped). Counted from our own bookkeeping, never from what the node reports
    (a node claiming a deep queue must not buy itself a longer timeout)."""
    if capacity == 0:
        return 0
    return max(in_flight - (capacity or 1), 0)
