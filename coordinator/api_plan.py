"""What a request asks for, planned before it is dispatched: its route and the
scheduler's request (`plan`), fitted to its key (`for_key`), its deadline, and the answer
cache's lookup (a hit is answered here, its ledger row stored)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import Response

from coordinator.api_context import ApiContext
from coordinator.cache import CachedResponse, cache_key
from coordinator.config import CoordinatorConfig
from coordinator.context_fit import fit_to_context
from coordinator.refusals import with_status
from coordinator.routing import Route, RouteError, RoutingConfig, UnknownRouteError, parse_route
from coordinator.scheduler import Request as Want
from meshgate.openai import OpenAIError, Parsed, unknown_model


async def plan(ctx: ApiContext, parsed: Parsed, header: str | None) -> tuple[Route, Want]:
    """The route and the scheduler's request: candidate models, sizes, policy."""
    body = parsed.body
    try:
        route = parse_route(body["model"], header)
        models = _routing(ctx.config).resolve(route)
    except UnknownRouteError as exc:
        raise OpenAIError(404, str(exc), code="model_not_found", param="model",
                          hop="coordinator") from None
    except RouteError as exc:
        raise OpenAIError(400, str(exc), param="model", hop="coordinator") from None
    dispatcher = ctx.dispatcher
    assert dispatcher is not None
    if not any(dispatcher.knows(m) for m in models):
        known = await asyncio.to_thread(ctx.known_models)
        if not any(m in known for m in models):
            raise unknown_model(route.model or "/".join(models), hop="coordinator")
    prompt, completion = fit_to_context(ctx, models, parsed)
    want = Want(
        models=models,
        prompt_tokens=prompt,
        max_tokens=completion,
        prefer=route.prefer,
        residency=route.residency,
    )
    return route, want


_routings: list[tuple[CoordinatorConfig, RoutingConfig]] = []


def _routing(config: CoordinatorConfig) -> RoutingConfig:
    """`config.routing()`, made once per config (it holds the config's own alias and task
    maps, not copies: the same answers)."""
    if not _routings or _routings[0][0] is not config:
        _routings[:] = [(config, config.routing())]
    return _routings[0][1]


def deadline_of(ctx: ApiContext, header: str | None) -> float:
    seconds = ctx.config.dispatch.deadline_s
    if header is not None:
        try:
            asked = float(header)
        except ValueError:
            raise OpenAIError(400, f"X-Meshgate-Timeout must be a number of seconds, not "
                              f"{header[:40]!r}", hop="coordinator") from None
        if not asked > 0:
            raise OpenAIError(400, "X-Meshgate-Timeout must be positive", hop="coordinator")
        seconds = min(seconds, asked)
    return asyncio.get_running_loop().time() + seconds


def spend_refresh(ctx: ApiContext, key_id: str) -> asyncio.Future[None] | None:
    """What to await before `for_key` when the key's budget figures are stale: their
    reread in a thread (`BudgetTracker.refresh_for`); None (nearly always) when not."""
    gate = ctx.gate
    if gate is None or gate.budgets is None:
        return None
    return gate.budgets.refresh_for(key_id)


def for_key(ctx: ApiContext, key_id: str, body: dict[str, Any], want: Want, *,
             request_id: str, header: str | None) -> Want:
    """Admit the request for its key (403 out of scope, 429 rate limited) and fit the
    scheduler's request to the key's scopes and budget."""
    if ctx.gate is None:
        return want
    hint = str(body["model"]) + (header or "")
    return ctx.gate.plan(key_id, body, want, request_id=request_id,
                         explicit_prefer="prefer=" in hint.replace(" ", "").lower())


async def from_cache(ctx: ApiContext, request_id: str, key_id: str, endpoint: str,
                      body: dict[str, Any]) -> tuple[str | None, Response | None]:
    """(the request's cache key or None, the cached answer or None; its row is stored)."""
    if ctx.cache is None:
        return None, None
    cached_as = cache_key(key_id, endpoint, body)
    if cached_as is None:
        return None, None
    hit = ctx.cache.get(cached_as)
    if ctx.metrics is not None:
        (ctx.metrics.cache_hits if hit else ctx.metrics.cache_misses).inc()
    if hit is None:
        return cached_as, None
    await ctx.commit(with_status(cache_row(request_id, key_id, endpoint, hit)))
    return cached_as, Response(hit.body, media_type="application/json", headers={
        "x-request-id": request_id, "x-meshgate-cache": "hit"})


def tokens_of(usage: dict[str, int] | None) -> tuple[int, int]:
    usage = usage or {}
    return int(usage.get("prompt_tokens", 0) or 0), int(usage.get("completion_tokens", 0) or 0)


def cache_row(request_id: str, key_id: str, endpoint: str, hit: CachedResponse
               ) -> dict[str, Any]:
    """The ledger row of an answer from the cache: no node, no cost, no tokens used."""
    return {
        "request_id": request_id, "key_id": key_id, "node_did": None, "upstream": None,
        "model": hit.model, "endpoint": endpoint, "prompt_tokens": 0, "completion_tokens": 0,
        "latency_ms": 0.0, "outcome": "cache_hit", "cost": 0.0, "route": "cache",
    }
