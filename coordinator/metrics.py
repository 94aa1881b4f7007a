"""The coordinator's Prometheus metrics, on a registry of its own (never the global one).

`Metrics()` makes a fresh `CollectorRegistry`, so two apps in one process
(tests) never share or clash. `/metrics` serves `Metrics.render()`.
Labels are bounded: `status` is the HTTP status, `model` the requested model
(cut to 100 characters; only authenticated requests are counted; a name no node
or cloud offers is `_unknown`, and past MAX_MODEL_LABELS distinct names the rest
are `_other`, so clients cannot grow the series without bound), `route` is
where it ran: `node`, `cloud`, `cache` or `none` (refused before dispatch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from coordinator.write_tick import WRITE_TICK, PacingCollector
from meshgate.lag_tick import LagTick

SCHEDULE_BUCKETS = (25e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


MAX_MODEL_LABELS = 256
"""Distinct model labels kept; far above the models a fleet serves, far below what hurts a
Prometheus server (each name makes a few series per status and route)."""


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None,
                 write_tick: LagTick | None = WRITE_TICK) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        if write_tick is not None:  # the process's write pacing (coordinator/write_tick.py)
            self.registry.register(PacingCollector(write_tick))
        self._model_labels: set[str] = set()
        self._children: dict[tuple[int, str, str, str], tuple[Any, Any]] = {}
        """(status, model, route, endpoint) -> the series `observe` counts in (bounded:
        statuses x MAX_MODEL_LABELS x routes x endpoints)"""
        self._tokens: dict[tuple[str, str], Any] = {}
        self._energy: dict[tuple[str, str], Any] = {}
        r = self.registry
        self.requests = Counter(
            "meshgate_coordinator_requests",
            "API requests answered, by status, model and route.",
            ["status", "model", "route"],
            registry=r,
        )
        self.latency = Histogram(
            "meshgate_coordinator_request_duration_seconds",
            "Time from a request's arrival to its last byte, by endpoint and route.",
            ["endpoint", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "meshgate_coordinator_tokens",
            "Tokens served, by kind (prompt, completion) and model.",
            ["kind", "model"],
            registry=r,
        )
        self.schedule = Histogram(
            "meshgate_coordinator_schedule_seconds",
            "Time one scheduling decision took (the scheduler over the live fleet index).",
            buckets=SCHEDULE_BUCKETS,
            registry=r,
        )
        self.queue_length = Gauge(
            "meshgate_coordinator_queue_length", "Requests waiting for a node.", registry=r
        )
        self.retries = Counter(
            "meshgate_coordinator_retries", "Requests tried again on another node.", registry=r
        )
        self.fallbacks = Counter(
            "meshgate_coordinator_cloud_fallbacks",
            "Requests sent to a cloud upstream.",
            ["upstream"],
            registry=r,
        )
        self.nodes_connected = Gauge(
            "meshgate_coordinator_nodes_connected", "Nodes with a live tunnel.", registry=r
        )
        self.cache_hits = Counter(
            "meshgate_coordinator_cache_hits",
            "Requests answered from the response cache.",
            registry=r,
        )
        self.cache_misses = Counter(
            "meshgate_coordinator_cache_misses",
            "Cacheable requests that were not in the response cache.",
            registry=r,
        )
        self.rate_limited = Counter(
            "meshgate_coordinator_rate_limited",
            "Requests refused by a key's rate limit.",
            ["limit"],
            registry=r,
        )
        self.energy = Counter(
            "meshgate_energy_joules",
            "Energy nodes measured for the requests they served, by model and route (node: "
            "through this coordinator; offline: uploaded from a node's journal).",
            ["model", "route"],
            registry=r,
        )
        self.budget_refused = Counter(
            "meshgate_coordinator_budget_refused",
            "Requests refused because the key's budget is spent.",
            registry=r,
        )

    def count_nodes(self, count: Callable[[], int]) -> None:
        """Read the connected-node count from `count` at every scrape."""
        self.nodes_connected.set_function(lambda: float(count()))

    def observe(
        self,
        *,
        status: int,
        model: str,
        route: str,
        endpoint: str,
        seconds: float,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        model = self.model_label(model)
        children = self._children
        key = (status, model, route, endpoint)
        got = children.get(key)
        if got is None:  # labels() validates and locks each time: once per label set here
            got = children[key] = (self.requests.labels(str(status), model, route),
                                   self.latency.labels(endpoint, route))
        got[0].inc()
        got[1].observe(max(0.0, seconds))
        if prompt_tokens:
            self._token_child("prompt", model).inc(prompt_tokens)
        if completion_tokens:
            self._token_child("completion", model).inc(completion_tokens)

    def _token_child(self, kind: str, model: str) -> Any:
        got = self._tokens.get((kind, model))
        if got is None:  # a series appears with its first tokens, as before the cache
            got = self._tokens[kind, model] = self.tokens.labels(kind, model)
        return got

    def model_label(self, model: str) -> str:
        """`model` as a label: cut to 100 characters, `_other` past MAX_MODEL_LABELS names."""
        model = model[:100]
        if model in self._model_labels:
            return model
        if len(self._model_labels) >= MAX_MODEL_LABELS:
            return "_other"
        self._model_labels.add(model)
        return model

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_row(self, row: Mapping[str, Any]) -> None:
        """Count one usage-ledger row of a request that ran (node, cloud or cache); rows of
        requests refused before they ran are counted where their error is answered."""
        if row.get("outcome") == "cache_hit":
            route = "cache"
        elif row.get("node_did"):
            route = "node"
        elif row.get("upstream"):
            route = "cloud"
        else:
            return
        self.count_energy(str(row.get("model", "-")), route, row.get("joules"))
        self.observe(
            status=int(row.get("status") or 200),  # a request that ran may still end in an error
            model=str(row.get("model", "-")),
            route=route,
            endpoint=str(row.get("endpoint", "-")),
            seconds=float(row.get("latency_ms") or 0.0) / 1000,
            prompt_tokens=int(row.get("prompt_tokens") or 0),
            completion_tokens=int(row.get("completion_tokens") or 0),
        )

    def count_energy(self, model: str, route: str, joules: float | None) -> None:
        if joules is not None and joules > 0:
            label = self.model_label(model)
            child = self._energy.get((label, route))
            if child is None:  # labels() validates and locks each time: once per pair here
                child = self._energy[label, route] = self.energy.labels(label, route)
            child.inc(joules)

    def served(self, tries: int, upstream: str | None) -> None:
        """A request started on its `tries`-th candidate, on a cloud when `upstream`."""
        if tries > 1:
            self.retries.inc(tries - 1)
        if upstream:
            self.fallbacks.labels(upstream).inc()

    def refused(self, status: int, model: str, code: str | None) -> None:
        """An error answered before (or instead of) running the request."""
        label = "_unknown" if code == "model_not_found" else self.model_label(model)
        self.requests.labels(str(status), label, "none").inc()
        if status == 429 and code == "rate_limit_exceeded":
            self.rate_limited.labels("key").inc()
        if code == "budget_exceeded":
            self.budget_refused.inc()
