"""The node's Prometheus metrics.

:class:`NodeMetrics` owns its own ``CollectorRegistry`` (never the global one,
so two daemons in one test process, or a library user's own metrics, do not
collide). Requests are counted as they finish (:meth:`NodeMetrics.track`);
figures the node already keeps elsewhere (in-flight and queue length per
model, runner restarts, VRAM, CPU) are read at scrape time by
:class:`_SnapshotCollector` from the model manager's stats and the latest
telemetry sample, so there is one source for each number.

Model labels are limited to the models this node serves (anything else is
``_unknown``), so a client sending random model names cannot grow the series.
Recent token rates are not kept here: the one tracker is each model slot's
(:class:`node_agent.slots.Rates`, in the manager's stats).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from meshgate.tick_metrics import tick_metrics
from node_agent.accounting import Accounting
from node_agent.energy import Energy
from node_agent.request_series import RequestSeries
from node_agent.runtimes.read_tick import READ_TICK, ReadTick

__all__ = ["CONTENT_TYPE_LATEST", "NodeMetrics", "RequestTrack"]

UNKNOWN = "_unknown"


class RequestTrack:
    """One request from arrival to its last byte; :meth:`finish` records it once."""

    def __init__(
        self, metrics: NodeMetrics, model: str, via: str, requested: str = "", endpoint: str = "-",
        *, began: tuple[float, float] | None = None,
    ) -> None:
        """`began`: when the request began (``time.monotonic()``, ``time.time()``), if
        before now (the track made a little later, off the request's way: `Meter`)."""
        self.metrics = metrics
        self.model = model
        self.via = via
        self.started = time.monotonic() if began is None else began[0]
        self.first_at: float | None = None
        self.usage: dict[str, int] | None = None
        self.finished = False
        accounting = metrics.accounting  # energy, and the journal while offline
        self.account = None if accounting is None else accounting.begin(
            requested or model, endpoint, via, served_here=model != UNKNOWN,
            started=None if began is None else began[1])

    def energy(self) -> Energy | None:
        """This request's energy so far, settled now (None: no accounting here)."""
        accounting = self.metrics.accounting
        if accounting is None or self.account is None:
            return None
        return accounting.energy(self.account)

    def energy_report(self) -> dict[str, Any]:
        """The END frame's energy fields (``meshgate.protocol``); {} without accounting."""
        energy = self.energy()
        if energy is None or self.metrics.accounting is None:
            return {}
        return {"joules": energy.joules, "energy_estimated": energy.estimated,
                "energy_cost": self.metrics.accounting.cost(energy)}

    def first_token(self) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()

    def answered(self, usage: dict[str, int] | None) -> None:
        """A whole answer is ready to leave: its journal row now (Accounting.record)."""
        accounting = self.metrics.accounting
        if accounting is not None and self.account is not None:
            accounting.record(self.account, 200, usage)

    def finish(self, status: int | str) -> None:
        if not self.finished:
            self.finished = True
            self.metrics._finish(self, str(status), time.monotonic())


class NodeMetrics:
    def __init__(
        self,
        *,
        served: Callable[[], Iterable[str]] = list,
        stats: Callable[[], dict[str, Any]] | None = None,
        telemetry: Callable[[], dict[str, Any] | None] | None = None,
        serves: Callable[[str], bool] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.accounting: Accounting | None = None  # the daemon sets it: see `account()`
        self._served = served
        #: whether a model is served here, asked per request (default: `in served()`)
        self._serves = serves or (lambda model: model in set(self._served()))
        #: requests, durations, times to first token, tokens: plain numbers until a scrape
        self.series = RequestSeries()
        self.registry.register(self.series)
        self.registry.register(_SnapshotCollector(stats, telemetry))

    def label(self, model: str) -> str:
        return model if self._serves(model) else UNKNOWN

    def account(self, accounting: Accounting) -> None:
        """Energy per request and the offline journal from now on (node_agent/accounting.py)."""
        self.accounting = accounting
        accounting.register(self.registry)

    def track(self, model: str, via: str = "proxy", endpoint: str = "-", *,
              began: tuple[float, float] | None = None) -> RequestTrack:
        return RequestTrack(self, self.label(model), via, model, endpoint, began=began)

    def _finish(self, track: RequestTrack, status: str, now: float) -> None:
        if self.accounting is not None and track.account is not None:
            self.accounting.finish(track.account, status, track.usage, track.model)
        usage = track.usage
        first = track.first_at
        self.series.add(
            track.model, status, track.via, now - track.started,
            first_after=first - track.started if first is not None and track.via == "proxy"
            else None,
            prompt=usage.get("prompt_tokens", 0) if usage else 0,
            completion=usage.get("completion_tokens", 0) if usage else 0,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SnapshotCollector(Collector):
    """Gauges read at scrape time from the manager's stats and the latest telemetry sample."""

    def __init__(
        self,
        stats: Callable[[], dict[str, Any]] | None,
        telemetry: Callable[[], dict[str, Any] | None] | None,
    ) -> None:
        self._stats = stats
        self._telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        yield from self._runtime()
        yield from self._sample()
        yield from pacing_metrics(READ_TICK)

    def _runtime(self) -> Iterator[Metric]:
        stats = self._stats() if self._stats else {}
        in_flight = GaugeMetricFamily(
            "meshgate_node_in_flight", "Requests being answered now.", labels=["model"]
        )
        queued = GaugeMetricFamily(
            "meshgate_node_queue_length", "Requests waiting for the model.", labels=["model"]
        )
        restarts = CounterMetricFamily(
            "meshgate_node_runner_restarts",
            "Runner crashes (each is followed by a restart).",
            labels=["model"],
        )
        for model, s in stats.items():
            if not isinstance(s, dict):
                continue
            in_flight.add_metric([model], float(s.get("in_flight", 0) or 0))
            queued.add_metric([model], float(s.get("queued", 0) or 0))
            restarts.add_metric([model], float(s.get("crashes", 0) or 0))
        yield from (in_flight, queued, restarts)

    def _sample(self) -> Iterator[Metric]:
        sample = self._telemetry() if self._telemetry else None
        if not sample:
            return
        host = sample.get("host") or {}
        cpu = GaugeMetricFamily(
            "meshgate_node_cpu_utilisation_percent", "Host CPU utilisation, mean of all cores."
        )
        cpu.add_metric([], float(host.get("cpu_util_pct", 0.0)))
        mem = GaugeMetricFamily("meshgate_node_memory_available_bytes", "Host memory available.")
        mem.add_metric([], float(host.get("mem_available_bytes", 0)))
        yield from (cpu, mem)
        gauges = {
            "vram_total_bytes": ("meshgate_node_gpu_vram_total_bytes", "GPU memory total."),
            "vram_used_bytes": ("meshgate_node_gpu_vram_used_bytes", "GPU memory used."),
            "gpu_util_pct": ("meshgate_node_gpu_utilisation_percent", "GPU utilisation."),
            "temperature_c": ("meshgate_node_gpu_temperature_celsius", "GPU temperature."),
            "power_draw_w": ("meshgate_node_gpu_power_watts", "GPU power draw."),
        }
        families = {
            k: GaugeMetricFamily(n, h, labels=["gpu", "uuid"]) for k, (n, h) in gauges.items()
        }
        for gpu in sample.get("gpus") or []:
            labels = [str(gpu.get("index")), str(gpu.get("uuid") or "")]
            for key, family in families.items():
                value = gpu.get(key)
                if value is not None:
                    family.add_metric(labels, float(value))
        yield from families.values()


_READ_PACING_HELPS = {
    "engaged": "1 while streamed reads are paced (the loop runs late, enough streams open).",
    "lag_seconds": "How late the node's event loop runs its timers, smoothed (while streams "
                   "are read).",
    "tick_seconds": "The tick a paced stream's reading waits for now (0 while not paced).",
    "streams": "Streamed answers being read now.",
    "paused_reads": "Reads after which a stream's connection waited for the tick.",
    "ticks": "Ticks that fired.",
    "engagements": "Times read pacing engaged.",
}


def pacing_metrics(tick: ReadTick) -> Iterator[Metric]:
    """Read pacing's state (node_agent/runtimes/read_tick.py): why tokens leave in batches."""
    return tick_metrics(tick, "meshgate_node_read_pacing", _READ_PACING_HELPS, "paused_reads")
