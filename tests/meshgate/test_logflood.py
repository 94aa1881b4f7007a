"""Log flood control: a storm of one kind of line is counted, not written."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from meshgate.logflood import FloodFilter
from meshgate.logs import RequestIdFilter, quick_info


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup() -> Iterator[tuple[logging.Logger, io.StringIO, Clock, FloodFilter]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    clock = Clock()
    flood = FloodFilter(rate=10, burst=20, total_rate=100, total_burst=200, report_every=5,
                        clock=clock)
    handler.addFilter(flood)
    root = logging.getLogger()
    root.addHandler(handler)
    log = logging.getLogger("flood.test")
    log.setLevel(logging.INFO)
    try:
        yield log, out, clock, flood
    finally:
        root.removeHandler(handler)


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_a_storm_of_one_kind_writes_its_burst_then_says_how_many_it_dropped(
        setup: tuple[logging.Logger, io.StringIO, Clock, FloodFilter]) -> None:
    log, out, clock, flood = setup
    for i in range(100_000):
        log.error("accept failed: %s", i)
    assert len(lines(out)) == 20
    assert flood.dropped_total == 100_000 - 20
    clock.now = 1.0  # ten more lines' worth of tokens
    log.error("accept failed: %s", "again")
    assert lines(out)[-1] == "flood.test accept failed: again (99980 similar lines dropped)"


def test_other_kinds_still_get_through_a_storm(
        setup: tuple[logging.Logger, io.StringIO, Clock, FloodFilter]) -> None:
    log, out, _, _ = setup
    for i in range(1000):
        log.warning("noise %s", i)
    log.warning("the one line that matters")
    assert lines(out)[-1] == "flood.test the one line that matters"


def test_a_storm_that_went_quiet_is_summed_up_by_the_next_line(
        setup: tuple[logging.Logger, io.StringIO, Clock, FloodFilter]) -> None:
    log, out, clock, _ = setup
    for _ in range(50):
        log.info("storm line %d", 1)
    clock.now = 6.0
    log.info("something else")
    tail = lines(out)[-2:]
    assert tail[0].startswith("meshgate.logflood log flood: dropped 30 lines of INFO flood.test")
    assert "storm line" in tail[0]
    assert tail[1] == "flood.test something else"


def test_all_kinds_together_are_bounded_too(
        setup: tuple[logging.Logger, io.StringIO, Clock, FloodFilter]) -> None:
    log, out, _, _ = setup
    for i in range(1000):
        log.info(f"unique line {i}")
    assert len(lines(out)) == 200


class CountingFlood(FloodFilter):
    filtered = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.filtered += 1
        return super().filter(record)


def _storm(quick: bool) -> tuple[list[str], int, int]:
    """Lines of two kinds in a storm, through quick_info or logger.info, on a logger of
    its own: (lines written, lines counted dropped, records the filter saw)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    handler.addFilter(RequestIdFilter())
    clock = Clock()
    flood = CountingFlood(rate=10, burst=20, total_rate=15, total_burst=30, report_every=5,
                          clock=clock)
    handler.addFilter(flood)
    log = logging.getLogger(f"flood.quick.{quick}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        for i in range(400):
            clock.now = i * 0.02  # 50 lines a second of each kind: both buckets run dry
            for template in ("a %s", "b %s"):
                if quick:
                    quick_info(log, template, i)
                else:
                    log.info(template, i)
    finally:
        log.removeHandler(handler)
    return out.getvalue().splitlines(), flood.dropped_total, flood.filtered


def test_a_quick_line_the_flood_drops_is_counted_the_same_and_never_made() -> None:
    written, dropped, filtered = _storm(quick=False)
    quick_written, quick_dropped, quick_filtered = _storm(quick=True)
    assert [w.split(" ", 1)[1] for w in quick_written] == [w.split(" ", 1)[1] for w in written]
    assert quick_dropped == dropped > 600  # the same lines dropped, by kind and in total
    assert filtered == 800
    assert quick_filtered == len(written)  # a record is made only for a line written
