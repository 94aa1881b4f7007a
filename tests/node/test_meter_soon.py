"""A whole answer's metering track made once the request waits (`Meter(track_soon=True)`):
from the request's own start, once, and at once when it is needed sooner."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any, cast

from node_agent.metrics import NodeMetrics
from node_agent.pipeline import Pipeline
from node_agent.request_meter import Meter


def _pipeline(metrics: NodeMetrics) -> Pipeline:
    # Meter reads the pipeline's metrics and hooks (and its manager for local answers
    # only: these are "mesh" here)
    return cast("Pipeline", SimpleNamespace(metrics=metrics, hooks=[], manager=None))


def _requests(metrics: NodeMetrics) -> dict[tuple[str, str, str], int]:
    return dict(metrics.series.requests)


async def test_the_track_is_made_in_a_callback_with_the_meters_start() -> None:
    metrics = NodeMetrics(served=lambda: ["m"])
    meter = Meter(_pipeline(metrics), "m", "chat/completions", "tunnel", "mesh",
                  track_soon=True)
    assert meter._track is None  # not on the request's way
    await asyncio.sleep(0)  # the loop turn: the callback ran
    track = meter._track
    assert track is not None
    assert track.started == meter.started  # its start is the request's, not the callback's
    meter.usage = {"prompt_tokens": 3, "completion_tokens": 4}
    meter.finish(200)
    meter.finish(500)  # once
    assert _requests(metrics) == {("m", "200", "tunnel"): 1}


class _Accounting:
    """Records what the track's accounting was told (a stand-in for Accounting)."""

    def __init__(self) -> None:
        self.started: list[float | None] = []

    def begin(self, model: str, endpoint: str, via: str, served_here: bool,
              started: float | None = None) -> object:
        self.started.append(started)
        return object()

    def finish(self, *args: Any) -> None:
        pass


async def test_the_accounting_row_starts_when_the_request_did() -> None:
    metrics = NodeMetrics(served=lambda: ["m"])
    accounting = _Accounting()
    metrics.accounting = cast("Any", accounting)
    before = time.time()
    Meter(_pipeline(metrics), "m", "chat/completions", "tunnel", "mesh", track_soon=True)
    after = time.time()
    await asyncio.sleep(0)
    (started,) = accounting.started
    assert started is not None
    assert before <= started <= after  # the wall time noted at the start, not the callback's


async def test_a_meter_finished_before_the_callback_is_tracked_once() -> None:
    metrics = NodeMetrics(served=lambda: ["m"])
    meter = Meter(_pipeline(metrics), "m", "chat/completions", "tunnel", "mesh",
                  track_soon=True)
    meter.finish(502)  # failed before the request waited: the track is made now
    made = meter._track
    assert made is not None
    assert made.started == meter.started
    await asyncio.sleep(0)  # the callback finds it made: no second track, no second count
    assert meter._track is made
    assert _requests(metrics) == {("m", "502", "tunnel"): 1}


async def test_without_track_soon_the_track_is_made_at_once() -> None:
    metrics = NodeMetrics(served=lambda: ["m"])
    meter = Meter(_pipeline(metrics), "m", "chat/completions", "proxy", "mesh")
    assert meter._track is not None
