"""The node's per-request series (plain numbers, exposed at scrape time) read as
prometheus_client's own Counter and Histogram would, sample for sample."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram

from node_agent.request_series import LATENCY_BUCKETS, RequestSeries


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples
            if not s.name.endswith("_created")}


def test_the_series_read_as_prometheus_clients_counters_and_histograms() -> None:
    ours = CollectorRegistry()
    series = RequestSeries()
    ours.register(series)
    theirs = CollectorRegistry()
    requests = Counter("meshgate_node_requests", "r", ["model", "status", "via"],
                       registry=theirs)
    latency = Histogram("meshgate_node_request_duration_seconds", "l", ["model", "via"],
                        buckets=LATENCY_BUCKETS, registry=theirs)
    ttft = Histogram("meshgate_node_time_to_first_token_seconds", "t", ["model"],
                     buckets=LATENCY_BUCKETS, registry=theirs)
    tokens = Counter("meshgate_node_tokens", "k", ["model", "kind"], registry=theirs)
    rng = random.Random(7)
    edges = [*LATENCY_BUCKETS, 0.0, 1e-9, 301.0, 1e6]  # on a bound is in that bucket
    for _ in range(500):
        model, status, via = rng.choice("ab"), rng.choice(["200", "499", "404"]), rng.choice(
            ["proxy", "tunnel"])
        duration = rng.choice(edges) if rng.random() < 0.5 else rng.uniform(0, 400)
        first = rng.choice([None, rng.choice(edges), rng.uniform(0, 10)])
        prompt, completion = rng.choice([0, 3, 12]), rng.choice([0, 1, 40])
        series.add(model, status, via, duration, first_after=first, prompt=prompt,
                   completion=completion)
        requests.labels(model, status, via).inc()
        latency.labels(model, via).observe(duration)
        if first is not None:
            ttft.labels(model).observe(first)
        if prompt:
            tokens.labels(model, "prompt").inc(prompt)
        if completion:
            tokens.labels(model, "completion").inc(completion)
    got, want = _samples(ours), _samples(theirs)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert abs(got[key] - value) <= 1e-6 * max(1.0, abs(value)), key
