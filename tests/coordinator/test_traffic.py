"""The last hour of traffic the pane and `top` chart: pure, with an injected clock."""

from __future__ import annotations

import pytest

from coordinator.traffic import BUCKET_S, WINDOW_S, Traffic, percentile


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def row(outcome: str = "ok", latency: float = 100.0, completion: int = 10) -> dict[str, object]:
    return {"request_id": "r", "model": "m", "outcome": outcome, "latency_ms": latency,
            "prompt_tokens": 5, "completion_tokens": completion, "node_did": "did:key:z1"}


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([], 50) is None


def test_a_minute_of_rows_gives_rates_percentiles_and_errors() -> None:
    clock = Clock()
    traffic = Traffic(clock)
    for i in range(60):
        clock.now += 1
        traffic.add(row(latency=float(i + 1)))
    traffic.add(row(outcome="no_capacity", latency=0.0, completion=0))
    summary = traffic.summary(clock.now, seconds=60)
    assert summary["requests"] == 61
    assert summary["errors"] == 1
    assert summary["p50_ms"] == 30.0  # errors carry no latency
    assert summary["tokens_per_s"] == pytest.approx(600 / 60, rel=0.2)


def test_rows_older_than_an_hour_fall_out_of_every_figure() -> None:
    clock = Clock()
    traffic = Traffic(clock)
    traffic.add(row())
    clock.now += WINDOW_S + BUCKET_S
    traffic.add(row(outcome="deadline"))
    series = traffic.series(clock.now)
    assert len(series["t"]) == WINDOW_S // BUCKET_S
    assert sum(series["errors"]) == 1
    assert sum(series["rps"]) * BUCKET_S == 1
    assert traffic.recent()[0]["outcome"] == "deadline"  # newest first
