"""The per-request series of the node's metrics, kept as plain numbers and exposed at scrape time.

Every request that ends adds to a few counters and histograms (:meth:`RequestSeries.add`).
prometheus_client's ``Counter`` and ``Histogram`` take a lock and go through a few calls for
each ``inc`` and ``observe`` (about 17 Python calls a request, on the request's way); here a
request costs a few dict updates on the event loop, and :meth:`RequestSeries.collect` (a
``Collector`` on the node's registry) turns them into the same families at scrape time:
``meshgate_node_requests_total``, ``meshgate_node_request_duration_seconds``,
``meshgate_node_time_to_first_token_seconds`` and ``meshgate_node_tokens_total``, with the
same labels and buckets (no ``_created`` samples).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["LATENCY_BUCKETS", "RequestSeries"]

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LE = [repr(float(b)) for b in LATENCY_BUCKETS] + ["+Inf"]  # as prometheus_client writes them


def _observe(series: dict[tuple[str, ...], list[float]], key: tuple[str, ...],
             value: float) -> None:
    """One observation: its bucket's count (not cumulative: `collect` sums) and the sum last."""
    counts = series.get(key)
    if counts is None:
        counts = series[key] = [0.0] * (len(_LE) + 1)
    counts[bisect_left(LATENCY_BUCKETS, value)] += 1
    counts[-1] += value


class RequestSeries(Collector):
    """Counts of finished requests, their durations, times to first token and tokens."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}  # (model, status, via)
        self.latency: dict[tuple[str, ...], list[float]] = {}  # (model, via)
        self.ttft: dict[tuple[str, ...], list[float]] = {}  # (model,)
        self.tokens: dict[tuple[str, str], int] = {}  # (model, kind)

    def add(self, model: str, status: str, via: str, duration: float, *,
            first_after: float | None, prompt: int, completion: int) -> None:
        """One request that ended: `first_after` its time to first token (None: not
        counted), `prompt` and `completion` its tokens."""
        key = (model, status, via)
        self.requests[key] = self.requests.get(key, 0) + 1
        _observe(self.latency, (model, via), duration)
        if first_after is not None:
            _observe(self.ttft, (model,), first_after)
        tokens = self.tokens
        if prompt:
            tokens[model, "prompt"] = tokens.get((model, "prompt"), 0) + prompt
        if completion:
            tokens[model, "completion"] = tokens.get((model, "completion"), 0) + completion

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "meshgate_node_requests",
            "Requests finished, by model, status (HTTP code, or 499 when the client left) and "
            "path (local proxy or tunnel).",
            labels=["model", "status", "via"],
        )
        for labels, count in list(self.requests.items()):
            requests.add_metric(list(labels), float(count))
        latency = HistogramMetricFamily(
            "meshgate_node_request_duration_seconds",
            "Time from arrival to the last byte of the answer.",
            labels=["model", "via"],
        )
        _histograms(latency, self.latency)
        ttft = HistogramMetricFamily(
            "meshgate_node_time_to_first_token_seconds",
            "Time from arrival to the first chunk of a streamed answer.",
            labels=["model"],
        )
        _histograms(ttft, self.ttft)
        tokens = CounterMetricFamily(
            "meshgate_node_tokens",
            "Tokens processed, by model and kind (prompt or completion).",
            labels=["model", "kind"],
        )
        for kind, count in list(self.tokens.items()):
            tokens.add_metric(list(kind), float(count))
        yield from (requests, latency, ttft, tokens)


def _histograms(family: HistogramMetricFamily,
                series: dict[tuple[str, ...], list[float]]) -> None:
    for labels, counts in list(series.items()):
        buckets, total = [], 0.0
        for le, count in zip(_LE, counts, strict=False):
            total += count
            buckets.append((le, total))
        family.add_metric(list(labels), buckets, sum_value=counts[-1])
