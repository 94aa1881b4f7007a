"""Usage a node served while its tunnel was down, uploaded from its journal when it is back.

A node opens a stream with ``OPEN {"usage_journal": [row, ...]}`` (see
``meshgate.protocol`` and ``node_agent/journal.py``). Each row becomes a
ledger row with ``route = "offline"``, the uploading node's did (never what
the row says), no API key (the app asked the node's local port), and an
``ingest_key``: a hash of (node did, the row's request id), unique in the
ledger, so a batch sent again (the node died before it read our END) is not
counted twice. The answer is ``END {"ingested": new, "duplicates": seen,
"rejected": bad}``; a row that does not parse is logged and left out (sending
it again would not fix it), so the node can let go of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from coordinator.errors import CoordinatorError
from coordinator.metrics import Metrics
from coordinator.registry import NodeConn
from coordinator.store import Store, UsageRecord
from meshgate.openai import ENDPOINTS
from meshgate.protocol import EnergyReport, ProtocolViolation, error_body, journal_rows
from tunnel import Frame, FrameType, Stream

__all__ = ["OFFLINE_ROUTE", "ingest_key", "journal_record", "node_streams"]

log = logging.getLogger(__name__)

OFFLINE_ROUTE = "offline"
#: A row's own time is kept if within this window of now; else it is stamped now.
MAX_AGE_S = 400 * 86400.0
MAX_SKEW_S = 300.0
MAX_TOKENS = 10_000_000

NodeStreamHandler = Callable[[NodeConn, Stream, Frame], Awaitable[None]]


def ingest_key(did: str, request_id: str) -> str:
    return hashlib.sha256(f"{did}\0{request_id}".encode()).hexdigest()


def _count(row: dict[str, Any], name: str) -> int:
    value = row.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
        raise ValueError(f"{name} must be a whole number from 0 to {MAX_TOKENS}")
    return value


def journal_record(did: str, row: dict[str, Any], now: float) -> UsageRecord:
    """One journal row as a ledger row (pure); ValueError naming the field that is wrong."""
    request_id, model = row.get("request_id"), row.get("model")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
        raise ValueError("request_id must be a string of 1 to 128 characters")
    if not isinstance(model, str) or not 0 < len(model) <= 255:
        raise ValueError("model must be a string of 1 to 255 characters")
    endpoint = row.get("endpoint")
    if endpoint not in (*ENDPOINTS, "-"):
        raise ValueError(f"unknown endpoint {endpoint!r}")
    latency, created = row.get("latency_ms", 0.0), row.get("created_at")
    if isinstance(latency, bool) or not isinstance(latency, int | float) or not (
        math.isfinite(latency) and latency >= 0
    ):
        raise ValueError("latency_ms must be a number of milliseconds")
    if (isinstance(created, bool) or not isinstance(created, int | float)
            or not now - MAX_AGE_S <= created <= now + MAX_SKEW_S):
        created = now
    outcome = row.get("outcome")
    energy = EnergyReport.from_wire(row)
    return UsageRecord(
        request_id=request_id,
        key_id=None,
        node_did=did,
        model=model,
        endpoint=str(endpoint),
        prompt_tokens=_count(row, "prompt_tokens"),
        completion_tokens=_count(row, "completion_tokens"),
        latency_ms=float(latency),
        outcome=outcome[:64] if isinstance(outcome, str) and outcome else "ok",
        created_at=float(created),
        route=OFFLINE_ROUTE,
        joules=energy.joules,
        energy_estimated=energy.estimated if energy.joules is not None else None,
        energy_cost=energy.cost,
        ingest_key=ingest_key(did, request_id),
    )


async def ingest(
    store: Store, metrics: Metrics | None, node: NodeConn, stream: Stream,
    rows: list[dict[str, Any]],
) -> None:
    now = time.time()
    records: list[UsageRecord] = []
    rejected = 0
    for row in rows:
        try:
            records.append(journal_record(node.did, row, now))
        except ValueError as exc:
            rejected += 1
            log.warning("node %s: journal row left out: %s", node.did, exc)
    try:
        new = await asyncio.to_thread(store.ingest_usage, records)
    except (SQLAlchemyError, CoordinatorError, OSError) as exc:  # the database is down
        log.warning("node %s: journal upload not stored: %r", node.did, exc)
        await stream.send(FrameType.ERROR, error_body(
            503, "the ledger cannot take rows now; keep them and retry", hop="coordinator"))
        return
    if metrics is not None:
        for record in new:
            metrics.count_energy(record.model, OFFLINE_ROUTE, record.joules)
    log.info("node %s uploaded %d journal row(s): %d new, %d already in the ledger, %d bad",
             node.did, len(rows), len(new), len(records) - len(new), rejected)
    await stream.send(FrameType.END, {"ingested": len(new),
                                      "duplicates": len(records) - len(new),
                                      "rejected": rejected})


def node_streams(
    store: Store, metrics: Metrics | None, requests: NodeStreamHandler
) -> NodeStreamHandler:
    """Streams a node opens: a journal upload is ingested here, anything else is a request
    for `requests` (the relay)."""

    async def on_stream(node: NodeConn, stream: Stream, frame: Frame) -> None:
        try:
            rows = journal_rows(frame.body)
        except ProtocolViolation as exc:
            await stream.send(FrameType.ERROR, error_body(400, str(exc), hop="coordinator"))
            return
        if rows is None:
            await requests(node, stream, frame)
            return
        await ingest(store, metrics, node, stream, rows)

    return on_stream
