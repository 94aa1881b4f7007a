"""Per request, once: its energy, and, while the coordinator cannot hear, a journal row.

The node's metrics track every request (``NodeMetrics.track``); when the
daemon gives them an :class:`Accounting`, each track opens a
:class:`RequestAccount` as it starts and settles it as it finishes:

- energy from the :class:`~node_agent.energy_meter.EnergyMeter` over the
  request's run, shared with whatever else ran at the same time (only for
  models served here: a request the mesh placed elsewhere costs this box
  nothing worth metering); the tunnel asks for it before its END frame, which
  carries it to the coordinator's ledger;
- a row in the :class:`~node_agent.journal.UsageJournal` for a request on
  the local port served here while the tunnel was down (at its start or at
  its end); the link uploads the journal when it is back, and the ledger
  marks the row ``route = "offline"``. A node that is not enrolled has no
  coordinator to tell and journals nothing.

Which devices a request's model uses comes from ``devices_for(model)``
(the daemon: a llama.cpp model with no layer on a GPU uses the CPU's meters
only, per the latest telemetry sample; anything else every device).

Every settled energy also counts in ``meshgate_node_energy_joules_total``
(per model); what the devices measured in all, idle included, is
``meshgate_node_energy_measured_joules_total`` (per device). The journal's
backlog is ``meshgate_node_usage_journal_pending_bytes``, and rows it had to
drop (full) ``meshgate_node_usage_journal_dropped_total``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node_agent.energy import Energy, Uses
from node_agent.energy_meter import EnergyMeter, Ticket
from node_agent.journal import UsageJournal

__all__ = ["Accounting", "RequestAccount", "outcome_of"]

log = logging.getLogger(__name__)

NOT_MEASURED = Energy(None)


def outcome_of(status: int | str) -> str:
    """The ledger's outcome word for a node-side HTTP status."""
    code = str(status)
    if code == "200":
        return "ok"
    if code == "499":
        return "client_cancelled"
    return f"error_{code}"


@dataclass
class RequestAccount:
    model: str
    endpoint: str
    via: str
    started: float  # wall clock
    offline_at_start: bool
    ticket: Ticket | None
    served_here: bool
    request_id: str = ""  # the journal row's id, made when a row is written
    recorded: bool = False  # the journal had its say (Accounting.record): once a request


class Accounting:
    def __init__(
        self,
        meter: EnergyMeter | None = None,
        journal: UsageJournal | None = None,
        online: Callable[[], bool] | None = None,
        devices_for: Callable[[str], Uses | None] | None = None,
    ) -> None:
        self.meter = meter
        self.devices_for = devices_for
        self.journal = journal
        self.online = online
        self.journaled = 0
        self.joules: Counter | None = None

    def register(self, registry: CollectorRegistry) -> None:
        """Add the energy series to a metrics registry."""
        self.joules = Counter(
            "meshgate_node_energy_joules",
            "Energy attributed to requests served here, by model (NVML energy counters, RAPL; "
            "power x time where a GPU has no counter).",
            ["model"],
            registry=registry,
        )
        if self.meter is not None:
            registry.register(_MeasuredCollector(self.meter))
        if self.journal is not None:
            registry.register(_JournalCollector(self.journal))

    def _offline(self) -> bool:
        return self.online is not None and not self.online()

    def begin(self, model: str, endpoint: str, via: str, served_here: bool,
              started: float | None = None) -> RequestAccount:
        """`started`: the request's ``time.time()`` when it began before now."""
        ticket = None
        if self.meter is not None and served_here:
            uses = self.devices_for(model) if self.devices_for is not None else None
            ticket = self.meter.begin(uses)
        return RequestAccount(
            model=model,
            endpoint=endpoint,
            via=via,
            started=time.time() if started is None else started,
            offline_at_start=served_here and self._offline(),
            ticket=ticket,
            served_here=served_here,
        )

    def energy(self, account: RequestAccount) -> Energy:
        """The request's energy, decided on the first call (the tunnel's END or the finish)."""
        if self.meter is None or account.ticket is None:
            return NOT_MEASURED
        return self.meter.end(account.ticket)

    def cost(self, energy: Energy) -> float | None:
        return self.meter.cost(energy) if self.meter is not None else None

    def finish(
        self,
        account: RequestAccount,
        status: int | str,
        usage: dict[str, int] | None,
        label: str,
    ) -> None:
        energy = self.energy(account)
        if energy.joules is not None and self.joules is not None:
            self.joules.labels(label).inc(energy.joules)
        self.record(account, status, usage)

    def record(self, account: RequestAccount, status: int | str,
               usage: dict[str, int] | None) -> None:
        """The journal row of a request served here while offline, once. A whole answer
        calls this before its bytes leave (``Meter.answered``), so a node killed as the
        client reads the answer has the row on disk; it then says ``ok`` even if that
        client went away before reading it (the work was done). Others at their finish."""
        if account.recorded:
            return
        account.recorded = True
        if not account.served_here or account.via == "tunnel" or self.journal is None:
            return
        if not (account.offline_at_start or self._offline()):
            return
        usage = usage or {}
        energy = self.energy(account)  # settled on its first call: the same figure finish counts
        account.request_id = account.request_id or "off_" + secrets.token_hex(12)
        row: dict[str, Any] = {
            "request_id": account.request_id,
            "model": account.model,
            "endpoint": account.endpoint,
            "prompt_tokens": int(usage.get("prompt_tokens", 0) or 0),
            "completion_tokens": int(usage.get("completion_tokens", 0) or 0),
            "latency_ms": round((time.time() - account.started) * 1000, 3),
            "outcome": outcome_of(status),
            "created_at": account.started,
            "joules": energy.joules,
            "energy_estimated": energy.estimated,
            "energy_cost": self.cost(energy),
        }
        if self.journal.append(row):
            self.journaled += 1


class _MeasuredCollector(Collector):
    def __init__(self, meter: EnergyMeter) -> None:
        self.meter = meter

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "meshgate_node_energy_measured_joules",
            "Energy the devices used since the daemon started, requests and idle, by device.",
            labels=["device"],
        )
        for device, joules in sorted(self.meter.totals.by_device.items()):
            family.add_metric([device], joules)
        yield family


class _JournalCollector(Collector):
    def __init__(self, journal: UsageJournal) -> None:
        self.journal = journal

    def collect(self) -> Iterator[Metric]:
        pending = GaugeMetricFamily(
            "meshgate_node_usage_journal_pending_bytes",
            "Usage served while the coordinator could not hear, not yet uploaded.")
        pending.add_metric([], float(self.journal.unacked_bytes))
        dropped = CounterMetricFamily(
            "meshgate_node_usage_journal_dropped",
            "Usage rows dropped because the journal was full (journal_max_bytes).")
        dropped.add_metric([], float(self.journal.dropped))
        yield from (pending, dropped)
