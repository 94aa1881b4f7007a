"""Token buckets, per-key rate limits and the key gate, on an injected clock (no sleeping)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from coordinator_harness import MODEL, coordinator

from coordinator.limits import (
    DEFAULT_MAX_TOKENS,
    KeyGate,
    RateLimited,
    RateLimiter,
    TokenBucket,
    estimate_tokens,
)
from coordinator.metering import BudgetTracker
from coordinator.scheduler_rules import Budget
from coordinator.store import KeyScopes
from meshgate.openai import OpenAIError


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_bucket_starts_full_and_refills_at_its_rate_per_second(clock: Clock) -> None:
    bucket = TokenBucket(60, clock)  # one a second, a minute's worth of burst
    assert bucket.wait_for(60) == 0
    bucket.take(60)
    assert bucket.wait_for(1) == pytest.approx(1.0)
    clock.t += 0.5
    assert bucket.wait_for(1) == pytest.approx(0.5)
    clock.t += 1000
    assert bucket.wait_for(60) == 0
    assert bucket.level == 60  # never more than the capacity


def test_a_clock_going_backwards_refills_nothing(clock: Clock) -> None:
    bucket = TokenBucket(60, clock)
    bucket.take(60)
    clock.t -= 100
    assert bucket.wait_for(1) == pytest.approx(1.0)


def test_requests_per_minute_refuse_the_next_request_with_a_retry_after(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    for _ in range(3):
        limiter.admit("k", rpm=3, tpm=None, tokens=10)
    with pytest.raises(RateLimited) as refused:
        limiter.admit("k", rpm=3, tpm=None, tokens=10)
    assert refused.value.status == 429
    assert refused.value.headers == {"Retry-After": "20"}  # 3/min: one every 20 s
    assert refused.value.limit == "requests"
    assert "3 requests per minute" in refused.value.message
    clock.t += 20
    limiter.admit("k", rpm=3, tpm=None, tokens=10)


def test_keys_have_their_own_buckets(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    limiter.admit("a", rpm=1, tpm=None, tokens=0)
    limiter.admit("b", rpm=1, tpm=None, tokens=0)
    with pytest.raises(RateLimited):
        limiter.admit("a", rpm=1, tpm=None, tokens=0)


def test_tokens_per_minute_count_the_estimate_and_retry_after_rounds_up(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    limiter.admit("k", rpm=None, tpm=600, tokens=550)
    with pytest.raises(RateLimited) as refused:
        limiter.admit("k", rpm=None, tpm=600, tokens=100)  # 50 missing at 10/s: 5 s
    assert refused.value.retry_after == 5
    assert refused.value.limit == "tokens"
    clock.t += 4.9
    with pytest.raises(RateLimited) as again:
        limiter.admit("k", rpm=None, tpm=600, tokens=100)
    assert again.value.retry_after == 1  # never 0
    clock.t += 0.1
    limiter.admit("k", rpm=None, tpm=600, tokens=100)


def test_a_refused_request_takes_nothing_from_the_other_bucket(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    limiter.admit("k", rpm=2, tpm=100, tokens=100)
    with pytest.raises(RateLimited):
        limiter.admit("k", rpm=2, tpm=100, tokens=50)  # tokens refuse; requests must not pay
    clock.t += 30  # 50 tokens back, and one request
    limiter.admit("k", rpm=2, tpm=100, tokens=50)
    clock.t += 30
    limiter.admit("k", rpm=2, tpm=100, tokens=50)


def test_settling_refunds_unused_tokens_and_charges_overruns(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    ticket = limiter.admit("k", rpm=None, tpm=1000, tokens=900)
    ticket.settle(100)  # only 100 used: 800 back
    second = limiter.admit("k", rpm=None, tpm=1000, tokens=900)
    second.settle(1500)  # used more than estimated: the bucket goes into debt
    with pytest.raises(RateLimited) as refused:
        limiter.admit("k", rpm=None, tpm=1000, tokens=1)
    # level 1000-100-1500 = -600; one more token needs 601 at 1000/60 a second
    assert refused.value.retry_after == 37
    second.settle(0)  # settling twice does nothing
    with pytest.raises(RateLimited):
        limiter.admit("k", rpm=None, tpm=1000, tokens=1)


def test_a_request_bigger_than_a_minutes_tokens_waits_for_a_full_bucket(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    limiter.admit("k", rpm=None, tpm=100, tokens=500)  # full bucket: admitted, in debt
    with pytest.raises(RateLimited) as refused:
        limiter.admit("k", rpm=None, tpm=100, tokens=500)
    assert refused.value.retry_after == 300  # from -400 back to full (100) at 100/min


def test_a_key_without_limits_is_never_limited(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    for _ in range(1000):
        limiter.admit("k", rpm=None, tpm=None, tokens=10**6).settle(5)


def test_changed_limits_start_fresh_buckets(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    limiter.admit("k", rpm=1, tpm=None, tokens=0)
    limiter.admit("k", rpm=2, tpm=None, tokens=0)


def test_token_estimates_read_messages_prompt_input_and_max_tokens() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 7}
    prompt, completion = estimate_tokens(chat)
    assert 100 <= prompt <= 125
    assert completion == 7
    assert estimate_tokens({"model": "m", "prompt": "abcd"})[1] == DEFAULT_MAX_TOKENS
    assert estimate_tokens({"model": "m", "prompt": "a", "max_completion_tokens": 3})[1] == 3
    assert estimate_tokens({"model": "m", "input": ["hello"]})[1] == 0


# ----------------------------------------------------------------------------- the gate


def test_the_gate_refuses_a_model_outside_the_keys_globs_with_403(clock: Clock) -> None:
    gate = KeyGate(RateLimiter(clock))
    gate.remember("k", KeyScopes(models=("smollm2", "llama-*")))
    assert gate.admit("k", ["llama-3-8b"], {}).models == ["llama-3-8b"]
    assert gate.admit("k", ["qwen", "smollm2"], {}, "fast").models == ["smollm2"]
    with pytest.raises(OpenAIError) as refused:
        gate.admit("k", ["qwen"], {}, "qwen")
    assert refused.value.status == 403
    assert refused.value.code == "model_not_allowed"
    assert "'qwen'" in refused.value.message
    assert "llama-*" in refused.value.message


def test_the_gate_hands_on_the_keys_policy_labels_and_limits(clock: Clock) -> None:
    gate = KeyGate(RateLimiter(clock))
    gate.remember("k", KeyScopes(prefer="local", labels={"site": "eu"}, rpm=1))
    admitted = gate.admit("k", ["m"], {"messages": [], "max_tokens": 5})
    assert (admitted.prefer, admitted.labels, admitted.max_tokens) == ("local", {"site": "eu"}, 5)
    assert admitted.budget == Budget.OK
    with pytest.raises(RateLimited):
        gate.admit("k", ["m"], {})


def test_an_unknown_key_has_no_limits(clock: Clock) -> None:
    gate = KeyGate(RateLimiter(clock))
    assert gate.admit("never-seen", ["m"], {}).models == ["m"]


def test_the_gate_settles_tokens_and_counts_cost_toward_the_budget(clock: Clock) -> None:
    budgets = BudgetTracker(lambda day, month: {}, clock=lambda: 1_800_000_000.0)
    gate = KeyGate(RateLimiter(clock), budgets)
    gate.remember("k", KeyScopes(tpm=1000, budget_day=1.0))
    admitted = gate.admit("k", ["m"], {"prompt": "x", "max_tokens": 900})
    gate.finish(admitted, {"prompt_tokens": 1, "completion_tokens": 9, "cost": 0.85})
    assert budgets.budget_for("k") == Budget.NEAR
    gate.admit("k", ["m"], {"prompt": "x", "max_tokens": 900})  # the refund made room
    refused = gate.refine(gate.admit("k", ["m"], {"max_tokens": 0}), OpenAIError(503, "none"))
    assert refused.status == 503  # near, not over: the 503 stays
    gate.finish(admitted, {"cost": 0.2})
    over = gate.admit("k", ["m"], {"max_tokens": 0})
    assert over.budget == Budget.OVER
    error = gate.refine(over, OpenAIError(503, "no node"))
    assert error.status == 402
    assert error.code == "budget_exceeded"
    assert "1.0500 of 1 today" in error.message


# ----------------------------------------------------------------------------- over HTTP


async def test_over_http_a_key_past_its_rpm_gets_429_with_retry_after(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as coord:
        key = coord.key(rpm=2)
        other = coord.key("other", rpm=2)
        first, second = await coord.chat(key), await coord.chat(key)
        refused = await coord.chat(key)
        assert (await coord.chat(other)).status_code == 200  # its own bucket
        client = openai.AsyncOpenAI(api_key=key, base_url=coord.url + "/v1", max_retries=0)
        with pytest.raises(openai.RateLimitError) as from_openai:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )
        await client.close()
    assert (first.status_code, second.status_code) == (200, 200)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 30  # 2/min: one every 30 s
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert "2 requests per minute" in error["message"]
    assert from_openai.value.status_code == 429
    assert len(coord.cloud.requests) == 3  # the refused ones never reached the upstream


async def test_over_http_a_model_outside_the_keys_scope_is_403(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as coord:
        narrow = coord.key("narrow", models=("smollm2", "llama-*"))
        wide = coord.key("wide", models=("gpt-*",))
        refused = await coord.chat(narrow)
        allowed = await coord.chat(wide)
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["code"] == "model_not_allowed"
    assert f"may not use the model '{MODEL}'" in error["message"]
    assert "llama-*, smollm2" in error["message"]
    assert allowed.status_code == 200
    assert len(coord.cloud.requests) == 1
