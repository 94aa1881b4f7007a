"""API keys: a burst with a key not cached verifies it once; a revoke during a
verification keeps its result out of the cache."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from starlette.requests import Request

from coordinator.api_context import ApiContext
from coordinator.registry import Registry


def _request(key: str) -> Request:
    return Request({"type": "http", "headers": [(b"authorization", f"Bearer {key}".encode())]})


def _context(verify: Any) -> ApiContext:
    return ApiContext(Registry(), verify_key=verify, known_models=set,
                      record_usage=lambda row: None)


async def test_a_burst_with_an_uncached_key_verifies_it_once() -> None:
    calls: list[str] = []
    gate = threading.Event()

    def verify(key: str) -> str | None:
        calls.append(key)
        gate.wait(10)
        return "key1" if key == "good" else None

    ctx = _context(verify)
    burst = [asyncio.create_task(ctx.authenticate(_request("good"))) for _ in range(50)]
    await asyncio.sleep(0)  # every request is waiting on the one verification
    gate.set()
    assert await asyncio.gather(*burst) == ["key1"] * 50
    assert calls == ["good"]
    assert await ctx.authenticate(_request("good")) == "key1"  # cached now
    assert calls == ["good"]


async def test_a_revoke_during_a_verification_keeps_its_result_out_of_the_cache() -> None:
    calls: list[str] = []
    entered, gate = threading.Event(), threading.Event()

    def verify(key: str) -> str | None:
        calls.append(key)
        entered.set()
        gate.wait(10)
        return "key1"

    ctx = _context(verify)
    first = asyncio.create_task(ctx.authenticate(_request("good")))
    await asyncio.to_thread(entered.wait, 10)
    ctx.forget_keys()  # the key was revoked while its check ran
    gate.set()
    assert await first == "key1"  # it was valid when that request came
    await ctx.authenticate(_request("good"))
    assert calls == ["good", "good"]  # checked again, not served from the cache
