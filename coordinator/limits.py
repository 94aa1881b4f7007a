"""Per-key rate limits: token buckets on requests per minute and tokens per minute.

In memory for one coordinator (`LocalBuckets`); replicas of a cluster keep the
same buckets in Redis (`shared_state.RedisBuckets`, coordinator/CLUSTER.md).
Each bucket holds up to one minute's allowance and refills continuously. A
request is admitted only when every bucket of its key has room (nothing is
taken from one bucket when another refuses), and is charged at admission with
an estimate: for tokens, the prompt estimate plus `max_tokens`. When the
request ends, `Admission.settle` corrects the token bucket by the actual usage
(a refund, or a further charge that may leave the bucket in debt so the next
request waits longer).

A refused request gets `RateLimited` (HTTP 429, OpenAI's `rate_limit_exceeded`)
with the whole seconds after which the same request would be admitted, for
the `Retry-After` header. A request that needs more tokens than the key may
use in a whole minute is admitted when the bucket is full (and leaves it in
debt), since waiting would never make room for it.

The clock is injected (`time.monotonic` by default) so tests never sleep.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

from coordinator.metering import BudgetTracker
from coordinator.routing import Prefer
from coordinator.scheduler import Request as Want
from coordinator.scheduler_rules import Budget
from coordinator.store import KeyScopes
from meshgate.openai import OpenAIError

Clock = Callable[[], float]

DEFAULT_MAX_TOKENS = 256
"""Charged at admission when the body sets no max_tokens (the runner's usual default)."""
CHARS_PER_TOKEN = 4
MAX_OPEN = 10_000
"""Admissions awaiting their ledger row; past this the oldest keep their estimate."""


class RateLimited(OpenAIError):
    """429 with the seconds to wait; `headers` go on the HTTP response."""

    def __init__(self, message: str, retry_after_s: float, limit: str) -> None:
        super().__init__(429, message, code="rate_limit_exceeded", hop="coordinator")
        self.retry_after = max(1, math.ceil(retry_after_s))
        self.limit = limit
        self.headers = {"Retry-After": str(self.retry_after)}


class TokenBucket:
    """`capacity` units, refilled at `per_minute / 60` units a second; may go into debt."""

    def __init__(self, per_minute: float, clock: Clock, capacity: float | None = None) -> None:
        if not per_minute > 0:
            raise ValueError(f"a rate must be positive, not {per_minute}")
        self.rate = per_minute / 60.0
        self.capacity = float(capacity if capacity is not None else per_minute)
        self.level = self.capacity
        self._clock = clock
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        if now > self._at:
            self.level = min(self.capacity, self.level + (now - self._at) * self.rate)
        self._at = max(self._at, now)

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` can be taken (0: now)."""
        self._refill()
        need = min(amount, self.capacity)  # more than a full bucket: admitted when full
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount

    def give(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)


def estimate_tokens(body: Mapping[str, Any], prompt: int | None = None) -> tuple[int, int]:
    """(prompt estimate, max completion tokens) of a parsed request body, cheaply.

    `prompt` is the caller's estimate when it has one (the API's, from the body it parsed:
    `Parsed.prompt_tokens_estimate`, the one the scheduler sizes the request with). Else
    the prompt is estimated at one token per 4 characters of its text (messages'
    content, `prompt` or `input`, encoded as JSON), which over-counts code and
    under-counts some scripts; the ledger's real counts correct the bucket afterwards.
    """
    if prompt is None:
        parts: list[Any] = []
        for name in ("messages", "prompt", "input"):
            if name in body:
                parts.append(body[name])
        text = json.dumps(parts, ensure_ascii=False) if parts else ""
        prompt = math.ceil(len(text) / CHARS_PER_TOKEN)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
        completion = limit
    elif "input" in body and "messages" not in body and "prompt" not in body:
        completion = 0  # embeddings generate nothing
    else:
        completion = DEFAULT_MAX_TOKENS
    return prompt, completion


@dataclass
class Admission:
    """One admitted request's charge; `settle` once its real usage is known."""

    limiter: RateLimiter | None
    key_id: str
    charged_tokens: int
    _settled: bool = field(default=False, repr=False)

    def settle(self, actual_tokens: int | None) -> None:
        """Correct the token bucket by the actual total tokens (None: keep the estimate)."""
        if self._settled or self.limiter is None or actual_tokens is None:
            self._settled = True
            return
        self._settled = True
        self.limiter.adjust(self.key_id, actual_tokens - self.charged_tokens)


class Ask(NamedTuple):
    """One bucket a request draws on: `kind` (requests or tokens) at `per_minute`."""

    kind: str
    per_minute: int
    amount: float


class Buckets(Protocol):
    """Where a limiter's buckets live: this process (`LocalBuckets`) or Redis, shared by
    every replica (`coordinator/shared_state.py`). Both run the bucket arithmetic of
    `TokenBucket`; the limiter's rules (what to ask, when to refuse) are in `RateLimiter`."""

    def take_all(self, key_id: str, asks: Sequence[Ask]) -> tuple[float, int]:
        """Take every ask if all have room now: (0, -1). Else take nothing and return
        (seconds until all would have room, index of the ask that waits longest)."""
        ...

    def adjust(self, key_id: str, ask: Ask) -> None:
        """Take `ask.amount` (give it back if negative) after the fact; may leave debt."""
        ...


class LocalBuckets:
    """The buckets in this process's memory: one coordinator's default."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._held: dict[tuple[str, str], tuple[int, TokenBucket]] = {}
        self._lock = threading.Lock()

    def _bucket(self, key_id: str, ask: Ask) -> TokenBucket:
        held = self._held.get((key_id, ask.kind))
        if held is None or held[0] != ask.per_minute:  # new key, or its limit changed
            held = (ask.per_minute, TokenBucket(ask.per_minute, self._clock))
            self._held[(key_id, ask.kind)] = held
        return held[1]

    def take_all(self, key_id: str, asks: Sequence[Ask]) -> tuple[float, int]:
        with self._lock:
            buckets = []
            worst, which = 0.0, -1
            for i, ask in enumerate(asks):
                bucket = self._bucket(key_id, ask)
                buckets.append(bucket)
                wait = bucket.wait_for(ask.amount)
                if wait > worst:
                    worst, which = wait, i
            if worst > 0:
                return worst, which
            for bucket, ask in zip(buckets, asks, strict=True):
                bucket.level -= ask.amount  # wait_for just refilled it
            return 0.0, -1

    def adjust(self, key_id: str, ask: Ask) -> None:
        with self._lock:
            held = self._held.get((key_id, ask.kind))
            if held is None or held[0] != ask.per_minute:
                return
            if ask.amount > 0:
                held[1].take(ask.amount)
            else:
                held[1].give(-ask.amount)


class RateLimiter:
    """The buckets of every key, created on first use; limits follow the key's scopes."""

    def __init__(self, clock: Clock = time.monotonic, buckets: Buckets | None = None) -> None:
        self.buckets: Buckets = buckets if buckets is not None else LocalBuckets(clock)
        self._tpm: dict[str, int] = {}

    def admit(self, key_id: str, *, rpm: int | None, tpm: int | None, tokens: int) -> Admission:
        """Charge one request of `tokens` estimated tokens, or raise RateLimited."""
        if not rpm and not tpm:
            return Admission(None, key_id, 0)
        asks: list[Ask] = []
        if rpm:
            asks.append(Ask("requests", rpm, 1))
        if tpm:
            asks.append(Ask("tokens", tpm, tokens))
            self._tpm[key_id] = tpm
        wait, which = self.buckets.take_all(key_id, asks)
        if wait > 0:
            ask = asks[which]
            raise RateLimited(
                f"rate limit of this API key reached ({ask.per_minute} {ask.kind} per minute); "
                f"retry after {max(1, math.ceil(wait))} s",
                wait,
                ask.kind,
            )
        return Admission(self, key_id, tokens if tpm else 0)

    def adjust(self, key_id: str, delta_tokens: int) -> None:
        """Charge (positive) or refund (negative) tokens after the fact."""
        tpm = self._tpm.get(key_id)
        if tpm is None or delta_tokens == 0:
            return
        self.buckets.adjust(key_id, Ask("tokens", tpm, delta_tokens))


# ----------------------------------------------------------------------------- the gate


@dataclass
class Admitted:
    """What the gate decided for one request: the models the key may use, the key's
    default policy and required labels, its budget state, and the rate-limit charge."""

    key_id: str
    models: list[str]
    prefer: str | None
    labels: dict[str, str]
    budget: Budget
    prompt_estimate: int
    max_tokens: int
    ticket: Admission


_NO_SCOPES = KeyScopes()
"""the scopes of a key the gate was not told of: no limits (frozen, shared)"""


class KeyGate:
    """Scope check (403), rate limits (429) and budget state for every API request.

    The API tells the gate each key's scopes when it verifies the key
    (`remember`), so admission needs no database query; scope changes and
    rotations reach the gate as soon as the key is verified again.
    """

    def __init__(
        self, limiter: RateLimiter | None = None, budgets: BudgetTracker | None = None
    ) -> None:
        self.limiter = limiter or RateLimiter()
        self.budgets = budgets
        self._scopes: dict[str, KeyScopes] = {}
        self._open: OrderedDict[str, Admitted] = OrderedDict()

    def remember(self, key_id: str, scopes: KeyScopes) -> None:
        self._scopes[key_id] = scopes
        if self.budgets is not None:
            self.budgets.remember(key_id, scopes)

    def scopes(self, key_id: str) -> KeyScopes:
        return self._scopes.get(key_id) or _NO_SCOPES

    def allowed(self, key_id: str, models: Sequence[str], asked: str,
                scopes: KeyScopes | None = None) -> list[str]:
        """The candidate models this key may use; 403 when none (`asked`: what the client
        wrote in `model`, for the message; `scopes`: the key's, when the caller has them)."""
        scopes = scopes or self.scopes(key_id)
        allowed = [m for m in models if scopes.allows_model(m)]
        if not allowed:
            patterns = ", ".join(scopes.models or ())
            raise OpenAIError(
                403,
                f"this API key may not use the model '{asked}'; it may use: {patterns}",
                code="model_not_allowed",
                param="model",
                hop="coordinator",
            )
        return allowed

    def admit(
        self, key_id: str, models: Sequence[str], body: Mapping[str, Any], asked: str | None = None,
        *, prompt_tokens: int | None = None,
    ) -> Admitted:
        """Check scope, then charge the rate limits; raises OpenAIError 403 or RateLimited.
        `prompt_tokens`: the caller's estimate (else one from `body`: `estimate_tokens`)."""
        scopes = self.scopes(key_id)
        allowed = self.allowed(key_id, models, asked or (models[0] if models else ""), scopes)
        prompt, completion = estimate_tokens(body, prompt_tokens)
        ticket = self.limiter.admit(
            key_id, rpm=scopes.rpm, tpm=scopes.tpm, tokens=prompt + completion
        )
        budget = self.budgets.budget_for(key_id) if self.budgets is not None else Budget.OK
        return Admitted(
            key_id, allowed, scopes.prefer, dict(scopes.labels), budget, prompt, completion, ticket
        )

    def finish(self, admitted: Admitted, row: Mapping[str, Any]) -> None:
        """After the request: correct the token bucket and count its cost toward the budget."""
        prompt = row.get("prompt_tokens")
        completion = row.get("completion_tokens")
        actual = (int(prompt or 0) + int(completion or 0)) if (prompt or completion) else None
        admitted.ticket.settle(actual)
        if self.budgets is not None:
            self.budgets.add(admitted.key_id, float(row.get("cost") or 0.0))

    def plan(
        self,
        key_id: str,
        body: Mapping[str, Any],
        want: Want,
        *,
        request_id: str,
        explicit_prefer: bool,
    ) -> Want:
        """Admit the request (403/429 here) and fit the scheduler's request to the key: only
        the models it may use, its default policy unless the request named one, its required
        node labels, its budget state. The admission is kept until `finish_row`."""
        admitted = self.admit(key_id, list(want.models), body, str(body.get("model", "")),
                              prompt_tokens=want.prompt_tokens)  # estimated once, by the API
        self._open[request_id] = admitted
        while len(self._open) > MAX_OPEN:  # rows that never came: keep the estimate charged
            self._open.popitem(last=False)
        prefer = (
            want.prefer if explicit_prefer or admitted.prefer is None else Prefer(admitted.prefer)
        )
        if (prefer == want.prefer and not admitted.labels and admitted.budget == want.budget_state
                and tuple(admitted.models) == tuple(want.models)):
            return want  # a key without scopes or budget: the request as the API planned it
        return replace(
            want,
            models=admitted.models,
            prefer=prefer,
            labels={**want.labels, **admitted.labels},
            budget_state=admitted.budget,
        )

    def admitted(self, request_id: str) -> Admitted | None:
        return self._open.get(request_id)

    def finish_row(self, row: Mapping[str, Any]) -> None:
        """A ledger row was written for a request `plan` admitted: settle it."""
        admitted = self._open.pop(str(row.get("request_id")), None)
        if admitted is None:
            return
        if row.get("outcome") == "cache_hit":
            admitted.ticket.settle(0)  # nothing ran: every estimated token back
        self.finish(admitted, row)

    def refine_for(self, request_id: str, error: OpenAIError) -> OpenAIError:
        admitted = self._open.get(request_id)
        return self.refine(admitted, error) if admitted is not None else error

    def refine(self, admitted: Admitted, error: OpenAIError) -> OpenAIError:
        """A 503 for a key whose budget is spent becomes the budget's 402 (cloud refused)."""
        if error.status == 503 and admitted.budget == Budget.OVER and self.budgets is not None:
            return self.budgets.refusal(admitted.key_id, "/".join(admitted.models))
        return error
